"""The metric-name extraction the Prometheus test relies on."""

from __future__ import annotations

import pytest

from tests.deploy._promql import expand_grafana, metric_names


@pytest.mark.parametrize(("expr", "names"), [
    ('up{job=~"surge|surge-router"} == 0', {"up"}),
    ("histogram_quantile(0.99, sum by (job, le) (rate(surge:ttft_bucket{a=\"b(c)\"}[5m])))",
     {"surge:ttft_bucket"}),
    ("sum(rate(a_total[1m])) by (instance) / on (instance) group_left(x) b > bool 1e3",
     {"a_total", "b"}),
    ("max_over_time(x[5m:1m] offset 5m) unless y", {"x", "y"}),
    ('label_replace(z, "dst", "$1", "src", "(.*)")', {"z"}),
])
def test_names_are_found_and_only_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_variables_expand_and_unknown_ones_fail() -> None:
    assert expand_grafana('rate(x{i=~"$instance"}[$__rate_interval])') == 'rate(x{i=~".*"}[1m])'
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        expand_grafana('x{i=~"$nope"}')
