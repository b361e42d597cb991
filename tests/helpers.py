from hypothesis import settings

GRAPH_FRACTION = 1 / 20


def graph_examples() -> int:
    return max(25, int(settings.default.max_examples * GRAPH_FRACTION))
