"""Batch jobs that survive restarts: OpenAI's Files and Batches API on a durable queue.

Users upload a JSONL file of requests (``POST /v1/files``), start a batch over it
(``POST /v1/batches``), and fetch the output file when it is done. Lines wait in a durable
queue (SQLite by default, RabbitMQ for workers on other machines) and run at low priority
when interactive traffic leaves room; every result is stored once, so a kill -9 anywhere loses
nothing and duplicates nothing.

Modules: ``store`` (SQLite state and file bytes), ``validate`` (input files), ``queue`` (the
queue interface and its backends), ``worker``, ``service`` (a batch's life inside the
server), ``routes`` (``add_batch_routes``), ``config`` (flags), ``cli`` (``surge batch``).
Nothing is imported here, so ``surge --help`` stays fast.
"""

__all__: list[str] = []
