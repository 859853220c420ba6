"""Tenants without a server: resolution, the tenants file, per-tenant admission slices, the
per-tenant metrics' label cap and Jain's index."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.requests import Request

from surge.cache.keys import tenant_of
from surge.http.errors import APIError
from surge.http.gate import KEY_ID_STATE
from surge.server.admission import AdmissionController, AdmissionRejected, TenantQuota
from surge.server.tenant_metrics import OTHER_TENANTS, TenantMetrics, jain_index
from surge.server.tenants import (
    ANONYMOUS_TENANT,
    Tenants,
    TenantsConfig,
    TenantsFileError,
    resolve_tenant,
    tenant_before_body,
)

pytestmark = pytest.mark.timeout(10)


def scope(key: str | None = None, **headers: str) -> dict[str, Any]:
    return {"type": "http", "headers": [(k.replace("_", "-").lower().encode(), v.encode())
                                        for k, v in headers.items()],
            "state": {KEY_ID_STATE: key} if key else {}}


# -- resolution ------------------------------------------------------------------------------


def test_key_id_wins_over_header_and_user_and_the_key_itself_never_appears() -> None:
    assert resolve_tenant(scope("key1", x_tenant="acme"), "bob", "X-Tenant") == "key1"


def test_header_then_user_then_anonymous() -> None:
    assert resolve_tenant(scope(x_tenant=" acme "), "bob", "X-Tenant") == "acme"
    assert resolve_tenant(scope(x_tenant="acme"), "bob", None) == "bob"  # header not trusted
    assert resolve_tenant(scope(), "bob", "X-Tenant") == "bob"
    assert resolve_tenant(scope(), None, "X-Tenant") == ANONYMOUS_TENANT
    assert resolve_tenant(scope(), "", None) == ANONYMOUS_TENANT


def test_overlong_user_is_named_by_a_digest_and_overlong_header_is_a_400() -> None:
    long_user = resolve_tenant(scope(), "u" * 1000, None)
    assert long_user.startswith("user:") and len(long_user) < 64
    assert long_user == resolve_tenant(scope(), "u" * 1000, None)
    with pytest.raises(APIError) as caught:
        resolve_tenant(scope(x_tenant="t" * 300), None, "X-Tenant")
    assert caught.value.status == 400 and "X-Tenant" in caught.value.message


def test_tenant_before_body_only_when_headers_decide() -> None:
    assert tenant_before_body(scope("key0"), None) == "key0"
    assert tenant_before_body(scope(x_tenant="a"), "X-Tenant") == "a"
    assert tenant_before_body(scope(), "X-Tenant") is None  # the body's user may decide


def test_cache_tenant_uses_the_same_resolution_and_keeps_users_apart() -> None:
    tenants = Tenants("X-Tenant")
    a = Request(scope(x_tenant="acme"))
    assert tenant_of(a, "bob", tenants) != tenant_of(a, "eve", tenants)
    assert tenant_of(a, None, tenants) != tenant_of(Request(scope(x_tenant="other")), None,
                                                    tenants)
    assert '"acme"' in tenant_of(a, None, tenants)


# -- the tenants file ------------------------------------------------------------------------

TOML = """
[default]
max_queued_requests = 4

[tenants.acme]
weight = 2
max_in_flight = 3
requests_per_minute = 60
"""


def test_toml_and_json_give_the_same_config_and_defaults_fill_in(tmp_path) -> None:
    toml_path = tmp_path / "t.toml"
    toml_path.write_text(TOML)
    json_path = tmp_path / "t.json"
    json_path.write_text('{"default": {"max_queued_requests": 4}, "tenants": {"acme": '
                         '{"weight": 2, "max_in_flight": 3, "requests_per_minute": 60}}}')
    config = TenantsConfig.load(toml_path)
    assert config == TenantsConfig.load(json_path)
    acme = config.limits("acme")
    assert (acme.weight, acme.max_in_flight, acme.max_queued_requests) == (2.0, 3, 4)
    assert config.limits("nobody").max_queued_requests == 4
    assert config.weights() == {"acme": 2.0}


@pytest.mark.parametrize(("text", "named"), [
    ('{"tenants": {"a": {"weight": 0}}}', "tenants.a.weight=0 is invalid"),
    ('{"tenants": {"a": {"weight": true}}}', "tenants.a.weight=True"),
    ('{"tenants": {"a": {"max_in_flight": 1.5}}}', "tenants.a.max_in_flight=1.5"),
    ('{"tenants": {"a": {"burst": 3}}}', "unknown setting(s) ['burst']"),
    ('{"tenant": {}}', "unknown top-level key(s) ['tenant']"),
    ('{"default": {"weight": 2}}', "default.weight is not supported"),
    ('{"tenants": []}', "'tenants' must be a table"),
    ("[tenants.a\nweight = 1", "not valid TOML"),
])
def test_bad_files_name_the_entry_and_what_is_allowed(text: str, named: str) -> None:
    with pytest.raises(TenantsFileError) as caught:
        TenantsConfig.parse(text, "t.conf")
    assert named in str(caught.value) and "t.conf" in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TenantsFileError, match="cannot be read"):
        Tenants(path=tmp_path / "absent.toml")


def test_changes_list_what_a_reload_changed() -> None:
    old = TenantsConfig.parse(TOML, "x.toml")
    new = TenantsConfig.parse(TOML.replace("weight = 2", "weight = 5") +
                              "[tenants.newco]\nweight = 1\n", "x.toml")
    changes = old.changes(new)
    assert any("'acme'" in c and "weight=2 " in c and "weight=5" in c for c in changes)
    assert any("'newco' added" in c for c in changes)
    assert old.changes(old) == []


def test_reload_keeps_the_old_config_when_the_file_breaks(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(TOML)
    tenants = Tenants(path=path)
    path.write_text("[tenants.acme]\nweight = -1\n")
    assert tenants.reload() is None
    assert tenants.limits("acme").weight == 2.0
    path.write_text(TOML.replace("weight = 2", "weight = 3"))
    assert tenants.reload() and tenants.limits("acme").weight == 3.0


def test_per_tenant_rate_limit_is_the_tenants_own() -> None:
    tenants = Tenants(config=TenantsConfig.parse(TOML, "x.toml"))
    for _ in range(60):
        tenants.charge("acme", 1)
    with pytest.raises(Exception, match="tenant 'acme'"):
        tenants.charge("acme", 1)
    tenants.charge("other", 1)  # no limit of its own


# -- per-tenant admission --------------------------------------------------------------------


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flooding_tenant_gets_429s_while_another_is_still_admitted() -> None:
    controller = AdmissionController(4, 10_000, time_fn=Clock())
    flood = [controller.admit(10, "A") for _ in range(4)]  # alone, A may take the whole queue
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(10, "A")
    assert caught.value.reason == "queue_full_requests" and caught.value.tenant == "A"
    # B holds less than its share (half of 4): admitted past the shared bound.
    b1, b2 = controller.admit(10, "B"), controller.admit(10, "B")
    with pytest.raises(AdmissionRejected):
        controller.admit(10, "B")  # now B is at its share
    with pytest.raises(AdmissionRejected):
        controller.admit(10, "A")
    assert controller.num_queued == 6
    b1.started()
    b2.release()
    controller.admit(10, "B")
    for ticket in flood:
        ticket.release()
    assert controller.tenant_counts() == {"B": (1, 2)}


def test_weights_size_the_shares() -> None:
    controller = AdmissionController(6, 10_000, time_fn=Clock())
    for _ in range(6):
        controller.admit(1, "A")
    heavy = TenantQuota(weight=2.0)
    for _ in range(4):  # 6 * 2 / (1 + 2)
        controller.admit(1, "B", heavy)
    with pytest.raises(AdmissionRejected):
        controller.admit(1, "B", heavy)


def test_tenant_quota_bounds_and_their_reasons() -> None:
    controller = AdmissionController(100, 10_000, time_fn=Clock())
    quota = TenantQuota(max_queued_requests=2, max_in_flight=3)
    first, second = controller.admit(1, "A", quota), controller.admit(1, "A", quota)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1, "A", quota)
    assert caught.value.reason == "tenant_queue_full"
    assert "max_queued_requests=2" in caught.value.message
    first.started()
    second.started()
    controller.admit(1, "A", quota)
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1, "A", quota)
    assert caught.value.reason == "tenant_in_flight_full"
    controller.admit(1, "B", quota)  # B's own bounds are untouched


def test_retry_after_is_the_tenants_own() -> None:
    clock = Clock()
    controller = AdmissionController(2, 10_000, time_fn=clock)
    tickets = [controller.admit(1, "A"), controller.admit(1, "A")]
    clock.now += 20  # A's queue stalls for 20 s
    with pytest.raises(AdmissionRejected) as caught:
        controller.admit(1, "A")
    assert caught.value.retry_after == 20
    assert controller.retry_after("B") == 20  # B has nothing waiting: the shared estimate
    for ticket in tickets:
        ticket.release()


def test_refusing_before_the_body_is_exact_only_for_a_known_tenant() -> None:
    controller = AdmissionController(2, 10_000, time_fn=Clock())
    controller.admit(1, "A")
    controller.admit(1, "A")
    with pytest.raises(AdmissionRejected):
        controller.refuse_if_full("A")
    controller.refuse_if_full("B")  # B has room
    controller.refuse_if_full(None)  # the body might name a tenant with room
    controller.admit(1, "B")
    controller.admit(1, "C")
    with pytest.raises(AdmissionRejected):
        controller.refuse_if_full(None)  # twice the bound: nobody gets in


def test_queue_is_bounded_at_twice_the_limit_whatever_the_tenants() -> None:
    controller = AdmissionController(4, 10_000, time_fn=Clock())
    admitted = 0
    for i in range(100):
        try:
            controller.admit(1, f"t{i}")
            admitted += 1
        except AdmissionRejected:
            pass
    assert 4 <= admitted <= 8 and controller.num_queued <= 8


# -- metrics ---------------------------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([]) is None
    assert jain_index([3, 3, 3]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([0, 0]) == 1.0


def test_label_cardinality_is_capped_with_overflow_in_other() -> None:
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, "m", max_labels=3)
    metrics.reserve(["vip"])
    for i in range(50):
        metrics.record_request(f"t{i}", 10, 5, 0.1, 0.2)
    text = generate_latest(registry).decode()
    tenants = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
               if "tenant_requests_total{" in line}
    assert tenants == {"vip", "t0", "t1", OTHER_TENANTS}
    assert f'tenant_requests_total{{model_name="m",tenant="{OTHER_TENANTS}"}} 48.0' in text


def test_fairness_index_over_backlogged_tenants_in_the_window() -> None:
    clock = Clock()
    weights = {"A": 1.0, "B": 2.0}
    metrics = TenantMetrics(CollectorRegistry(), "m", window=10, time_fn=clock,
                            weight_of=lambda t: weights.get(t, 1.0))
    metrics.record_request("A", 0, 10, None, None)
    metrics.record_request("B", 0, 20, None, None)  # twice A's tokens at twice the weight
    metrics.record_request("C", 0, 1, None, None)  # asked for little: not backlogged
    assert metrics.fairness_index() is None  # nobody backlogged yet
    metrics.record_backlogged("A")
    metrics.record_backlogged("B")
    assert metrics.fairness_index() == pytest.approx(1.0)
    metrics.record_request("A", 0, 30, None, None)
    assert metrics.fairness_index() == pytest.approx(jain_index([40, 10]))
    clock.now += 11  # the window moved on
    assert metrics.fairness_index() is None


def test_context_sheds_before_parsing_only_when_the_tenant_is_certain() -> None:
    from surge.http.auth import RateLimiter
    from surge.server.context import RequestContext
    from surge.server.metrics import ServerMetrics

    context = RequestContext(AdmissionController(2, 10_000, time_fn=Clock()),
                             RateLimiter(None, None), ServerMetrics(), None,
                             Tenants("X-Tenant"))
    context.admit(1)
    context.admit(1)  # anonymous fills the queue
    assert context.shed(scope(), None) is None  # the body may name another tenant
    refused = context.shed(scope(), b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert refused is not None and refused.status == 429  # no user key: anonymous
    assert context.shed(scope(), b'{"prompt": "x", "user": "bob"}') is None  # bob has room
    assert context.shed(scope(x_tenant="acme"), None) is None  # acme has room
    assert context.shed(scope(x_tenant="anonymous"), None) is not None
