"""The cluster's /metrics: every replica's exposition text, each sample labelled with its
replica (`replica="<name>"`), merged into one text (one HELP/TYPE per metric family), so one
scrape of the endpoint sees the whole cluster and sums across replicas are `sum by (...)`."""

from __future__ import annotations

from typing import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


def merge_metrics(texts: Mapping[str, str], unavailable: int = 0) -> bytes:
    """`texts`: replica name -> its /metrics text; `unavailable`: replicas that did not answer."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples]
    answered = GaugeMetricFamily("omnistream_cluster_replicas", "Replicas by whether they answered this scrape",
                                 labels=["state"])
    answered.add_metric(["answered"], len(texts))
    answered.add_metric(["unavailable"], unavailable)
    registry = CollectorRegistry()
    registry.register(_Fixed([answered, *families.values()]))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)

    def describe(self) -> list[Metric]:
        return []
