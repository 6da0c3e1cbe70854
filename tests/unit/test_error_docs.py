"""docs/errors.md prints the Keycloak error table exactly as app/keycloak_errors.py holds it."""

from __future__ import annotations

from pathlib import Path

from app.keycloak_errors import RULES

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def rendered_table() -> str:
    """The Markdown table docs/errors.md must contain, one row per rule, in matching order."""
    lines = [
        "| broker call | Keycloak `error` | Keycloak `error_description` starts with | status | `error` | `message` | when |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        outcome = rule.outcome()
        description = f"`{rule.description}`" if rule.description is not None else "(anything)"
        lines.append(
            f"| {', '.join(rule.operations)} | `{rule.error}` | {description} | {outcome.status} "
            f"| `{outcome.error}` | {outcome.message} | {rule.note} |"
        )
    return "\n".join(lines)


def test_docs_print_the_error_table():
    """Every rule of the table, and nothing else, appears in docs/errors.md in the same order."""
    assert rendered_table() in DOC.read_text(), "docs/errors.md is stale; paste this table:\n" + rendered_table()
