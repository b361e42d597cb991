"""The models and rewrites as Markdown, rendered from the rewrite classes themselves (their
``name``, ``summary`` and ``contract``) so that the documentation cannot drift from the code.
``python -m surgery list --markdown`` prints it; README.md and docs/rewrites.md hold its output."""

from __future__ import annotations

from collections.abc import Mapping

from .rewrites import REGISTRY, SPEED_REWRITES

PROBE_CHOSEN = "probe"  # chosen by the TVM probe (``--rewrite auto``) or by name
SPEED = "speed"  # applied by the shipped TVM build (``--schedules ours``)


def rewrite_kinds() -> dict[str, tuple[str, type]]:
    """name -> (kind, class), in run order: the probe-chosen rewrites, then the speed rewrites."""
    return {
        **{name: (PROBE_CHOSEN, cls) for name, cls in REGISTRY.items()},
        **{name: (SPEED, cls) for name, cls in SPEED_REWRITES.items()},
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def models_table(models: Mapping[str, str]) -> str:
    """One row per model: its name and what it is (``models`` maps name -> description)."""
    rows = [f"| `{name}` | {_cell(description)} |" for name, description in models.items()]
    return "\n".join(["| model (`python -m surgery apply NAME`) | what it is |", "|---|---|", *rows])


def rewrites_table() -> str:
    """One row per rewrite, in run order."""
    rows = [f"| `{name}` | {kind} | {_cell(cls.summary)} |" for name, (kind, cls) in rewrite_kinds().items()]
    return "\n".join(["| rewrite | kind | what it replaces |", "|---|---|---|", *rows])


def contracts_markdown() -> str:
    """One section per rewrite, in run order: what it replaces and its contract."""
    sections = [
        f"### `{name}` ({kind})\n\n{cls.summary}.\n\n**Contract:** {cls.contract}."
        for name, (kind, cls) in rewrite_kinds().items()
    ]
    return "\n\n".join(sections)


def catalog_markdown(models: Mapping[str, str], contracts: bool = True) -> str:
    """The models table, the rewrites table and (unless ``contracts`` is False) every contract."""
    parts = [
        models_table(models),
        (
            f"Rewrites, in the order they run. Kind `{PROBE_CHOSEN}`: chosen per TVM by its probe "
            f"(`--rewrite auto`, the default) or by name; kind `{SPEED}`: applied after those by the shipped "
            "TVM build (`--schedules ours`, the default)."
        ),
        rewrites_table(),
    ]
    if contracts:
        parts.append(contracts_markdown())
    return "\n\n".join(parts) + "\n"
