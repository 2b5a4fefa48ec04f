"""Small box geometry shared by the stages that match people between frames."""

from __future__ import annotations

import numpy as np


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,M) intersection areas between (N,4) and (M,4) xyxy boxes (a single box may be (4,)).

    Example:
        >>> box_intersection(np.array([0, 0, 10, 10]), np.array([[5, 5, 20, 20], [20, 20, 30, 30]])).tolist()
        [[25.0, 0.0]]
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    return iw * ih


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N,4) and (M,4) xyxy boxes (a single box may be given as shape (4,)).

    Example:
        >>> box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])).round(3).tolist()
        [[1.0, 0.333, 0.0]]
    """
    inter = box_intersection(a, b)
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None, :, :]
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def assign(cost: np.ndarray, limit: float) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one pairs (row, col) of a cost matrix, leaving out pairs above ``limit``.

    Example:
        >>> assign(np.array([[0.1, 0.9], [0.2, 0.3]]), limit=0.5)
        [(0, 0), (1, 1)]
        >>> assign(np.zeros((0, 3)), limit=0.5)
        []
    """
    import lap

    cost = np.asarray(cost, np.float64)
    if cost.size == 0:
        return []
    _, x, _ = lap.lapjv(cost, extend_cost=True, cost_limit=limit)
    return [(int(i), int(j)) for i, j in enumerate(x) if j >= 0]


def on_border(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N,) True for each box with a side on the frame border (see :func:`border_margin`)."""
    w, h = size
    mx, my = border_margin(w), border_margin(h)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.column_stack([b[:, 0] <= mx, b[:, 1] <= my, b[:, 2] >= w - mx, b[:, 3] >= h - my]).any(axis=1)


def border_margin(extent: float) -> float:
    """How close (px) to the frame border a box side counts as cut off by it.

    Detectors stop a few pixels short of the border for a person walking out of view.

    Example:
        >>> border_margin(432), border_margin(1080)
        (6.48, 16.2)
    """
    return max(2.0, round(0.015 * extent, 2))


def first_edge_crossing(points: np.ndarray, *, block: int = 128) -> tuple[int, int] | None:
    """The first pair of non-adjacent edges (i < j) of a closed polygon that cross or touch, or None.

    Edge ``i`` runs from point ``i`` to point ``i + 1`` (the last edge closes the ring). Two edges
    meet when they cross properly, or when an end of one lies on the other (collinear overlaps and
    a vertex touching an edge count). All pairs are tested with numpy, ``block`` rows at a time, so
    a 1000-point polygon takes milliseconds and bounded memory.

    Example:
        >>> first_edge_crossing(np.array([[0, 0], [4, 4], [4, 0], [0, 4]]))  # a bow tie
        (0, 2)
        >>> first_edge_crossing(np.array([[0, 0], [4, 0], [4, 4], [0, 4]])) is None
        True
    """
    p = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(p)
    if n < 4:
        return None
    a, b = p, np.roll(p, -1, axis=0)  # edge k: a[k] -> b[k]
    cols = np.arange(n)

    def orient(o, d, c):  # sign of the turn o -> d -> c (same operation order as the scalar formula)
        return (d[..., 0] - o[..., 0]) * (c[..., 1] - o[..., 1]) - (d[..., 1] - o[..., 1]) * (c[..., 0] - o[..., 0])

    def on_segment(s, e, c):  # c inside the bounding box of segment s-e (used once c is collinear)
        return ((np.minimum(s[..., 0], e[..., 0]) <= c[..., 0]) & (c[..., 0] <= np.maximum(s[..., 0], e[..., 0]))
                & (np.minimum(s[..., 1], e[..., 1]) <= c[..., 1]) & (c[..., 1] <= np.maximum(s[..., 1], e[..., 1])))

    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        p1, p2 = a[rows][:, None, :], b[rows][:, None, :]  # edges i (rows)
        q1, q2 = a[None, :, :], b[None, :, :]  # edges j (columns)
        d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
        d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
        proper = ((d1 > 0) != (d2 > 0)) & (d1 != 0) & (d2 != 0) & ((d3 > 0) != (d4 > 0)) & (d3 != 0) & (d4 != 0)
        touch = ((d1 == 0) & on_segment(q1, q2, p1)) | ((d2 == 0) & on_segment(q1, q2, p2)) \
            | ((d3 == 0) & on_segment(p1, p2, q1)) | ((d4 == 0) & on_segment(p1, p2, q2))
        i, j = rows[:, None], cols[None, :]
        candidates = (j > i + 1) & ~((i == 0) & (j == n - 1))  # each pair once; adjacent edges share a vertex
        hit = np.argwhere((proper | touch) & candidates)
        if len(hit):
            return int(rows[hit[0, 0]]), int(hit[0, 1])
    return None


def polygon_meets_frame(polygon, size: tuple[int, int]) -> bool:
    """Whether any part of a polygon (edge or inside) lies in the frame ``[0, w] x [0, h]``.

    False means the polygon lies entirely outside frames of that size (a region drawn for another
    resolution, say). Each edge is clipped to the frame (Liang–Barsky, all edges at once); when
    no edge reaches the frame, the frame is either wholly inside the polygon or wholly outside it,
    which its centre tells.

    Example:
        >>> polygon_meets_frame([[700, 400], [900, 400], [900, 500]], (640, 360))
        False
        >>> polygon_meets_frame([[600, 300], [900, 300], [900, 500]], (640, 360))
        True
        >>> polygon_meets_frame([[-9, -9], [999, -9], [999, 999], [-9, 999]], (640, 360))  # around the frame
        True
        >>> polygon_meets_frame([[-100, 50], [50, -100], [-100, -100]], (640, 360))  # bounding box overlaps, polygon not
        False
    """
    import cv2

    w, h = size
    p = np.asarray(polygon, np.float64).reshape(-1, 2)
    d = np.roll(p, -1, axis=0) - p  # edge k: p[k] + t * d[k], t in [0, 1]
    t0, t1 = np.zeros(len(p)), np.ones(len(p))
    meets = np.ones(len(p), bool)
    # Inside the frame side by side: x >= 0, x <= w, y >= 0, y <= h, each as pk * t <= qk.
    for pk, qk in ((-d[:, 0], p[:, 0]), (d[:, 0], w - p[:, 0]), (-d[:, 1], p[:, 1]), (d[:, 1], h - p[:, 1])):
        meets &= ~((pk == 0) & (qk < 0))  # parallel to that side and beyond it
        with np.errstate(divide="ignore", invalid="ignore"):
            r = qk / pk
        t0 = np.where(pk < 0, np.maximum(t0, r), t0)
        t1 = np.where(pk > 0, np.minimum(t1, r), t1)
    if np.any(meets & (t0 <= t1)):
        return True
    return cv2.pointPolygonTest(p.astype(np.float32).reshape(-1, 1, 2), (w / 2, h / 2), False) >= 0
