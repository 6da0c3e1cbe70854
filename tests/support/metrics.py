"""Reading /metrics as numbers, so a test can compare what a request changed (the registry is process-wide)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, tuple[tuple[str, str], ...]]


def series(name: str, **labels: str) -> Series:
    """The key of one sample: its name and its labels."""
    return name, tuple(sorted(labels.items()))


def samples(client) -> dict[Series, float]:
    """Every sample /metrics shows now, by name and labels."""
    text = client.get("/metrics").get_data(as_text=True)
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def changes(before: dict[Series, float], after: dict[Series, float], *wanted: Series) -> dict[Series, float]:
    """How much each wanted sample grew between two readings (0 when it did not move or does not exist)."""
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in wanted}
