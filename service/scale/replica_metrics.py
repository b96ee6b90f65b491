"""``GET /metrics`` of a scaled service: every replica's own metrics in one scrape, each series labelled with the
replica that exported it (``replica``), so that Prometheus keeps them apart and sums or compares them as asked."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class Labelled:
    """A Prometheus collector of the families in ``texts`` (replica name -> its scrape, the text format), each
    sample with the label ``REPLICA_LABEL`` naming its replica; a family several replicas export is one family."""

    def __init__(self, texts: Mapping[str, str]):
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, REPLICA_LABEL: replica}, sample.value,
                                      sample.timestamp, sample.exemplar)
        return iter(families.values())


def labelled(texts: Mapping[str, str]) -> bytes:
    """One scrape (the text format) of the replicas' scrapes ``texts`` (replica name -> text), labelled by replica.
    Raises ValueError for a text that is not Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Labelled(texts))
    return generate_latest(registry)
