"""Drawing: the one module that paints on frames (annotated video, live preview, entry snapshots).

Small single-purpose annotators in the style of Roboflow's ``supervision``; each one draws on a
BGR uint8 image in place and returns it. Everything is vectorised (numpy / OpenCV): blending is
done on the bounding rectangle of a shape with a boolean mask, never pixel by pixel.

* :class:`RegionAnnotator`: region polygons, translucent fill, outline and a live count label.
* :class:`PersonAnnotator`: each person's mask (SAM2), box and track id in a stable per-track colour.
* :class:`BannerAnnotator`: small "entered" / "left" banners for recent transitions.
* :class:`SceneBuilder` follows the pipeline's results (frame, tracker update, transitions) and
  gives an immutable :class:`Scene` per frame; :class:`SceneAnnotator` draws a scene on an image.
* :func:`render_snapshot` draws the entry snapshot: the event's region and that person.

Drawing code lives here only; pipeline stages hand results to observers and never draw.

Example:
    >>> import numpy as np
    >>> from daemon.config import RegionConfig
    >>> from daemon.records import Frame, TrackedPerson, TrackUpdate
    >>> regions = [RegionConfig(id="table", polygon=[[10, 10], [90, 10], [90, 60], [10, 60]])]
    >>> builder, annotator = SceneBuilder(regions), SceneAnnotator(regions)
    >>> frame = Frame("hall", 0, 0.0, 0.0, np.full((80, 120, 3), 200, np.uint8))
    >>> person = TrackedPerson(3, np.array([20.0, 5.0, 50.0, 55.0]), 0.9)
    >>> scene = builder.observe(frame, TrackUpdate(frame, (person,)), [])
    >>> out = annotator.annotate(frame.image, scene)
    >>> out.shape, out is frame.image, bool((out != frame.image).any())
    ((80, 120, 3), False, True)
"""

from __future__ import annotations

import colorsys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from daemon.config import RegionConfig
from daemon.events import RegionTransition
from daemon.records import Frame, TrackedPerson, TrackUpdate

BGR = tuple[int, int, int]

REGION_COLOR: BGR = (40, 40, 225)
"""Regions are drawn in translucent red, as in the notebook this project grew from."""
ENTRY_COLOR: BGR = (70, 160, 40)
EXIT_COLOR: BGR = (0, 150, 240)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _hex_bgr(h: str) -> BGR:
    h = h.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return b, g, r


class ColorPalette:
    """Stable colours for track ids: the same id always gets the same colour.

    The default is matplotlib's ``tab10`` (the notebook's mask colours) without red, which is
    the regions' colour, and grey, which vanishes on grey clothes and walls.

    Example:
        >>> p = ColorPalette.default()
        >>> p.by_id(1) == p.by_id(1), p.by_id(1) != p.by_id(2), len(p)
        (True, True, 8)
        >>> ColorPalette.hsv(3).by_id(1)
        (0, 0, 230)
    """

    TAB10_NO_RED_GREY = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#e377c2", "#17becf", "#bcbd22", "#8c564b")

    def __init__(self, colors: Sequence[BGR]):
        if not colors:
            raise ValueError("a palette needs at least one colour")
        self.colors = tuple(tuple(int(c) for c in col) for col in colors)

    @classmethod
    def default(cls) -> ColorPalette:
        return cls([_hex_bgr(h) for h in cls.TAB10_NO_RED_GREY])

    @classmethod
    def hsv(cls, n: int, saturation: float = 1.0, value: float = 0.9) -> ColorPalette:
        """``n`` colours evenly spaced in hue."""
        cols = []
        for i in range(n):
            r, g, b = colorsys.hsv_to_rgb(i / n, saturation, value)
            cols.append((round(b * 255), round(g * 255), round(r * 255)))
        return cls(cols)

    def by_id(self, track_id: int) -> BGR:
        """The colour of a track (ids start at 1; id 1 gets the first colour)."""
        return self.colors[(int(track_id) - 1) % len(self.colors)]

    def __len__(self) -> int:
        return len(self.colors)


def text_scale(image: np.ndarray) -> float:
    """A font scale that reads well at the image's size (0.5 at 432 lines, 1.0 at 1080p)."""
    return float(np.clip(min(image.shape[:2]) / 1000.0 + 0.07, 0.4, 1.6))


def blend(image: np.ndarray, mask: np.ndarray, color: BGR, alpha: float, origin: tuple[int, int] = (0, 0)) -> None:
    """Tint the pixels of ``image`` where ``mask`` is true with ``color`` at opacity ``alpha``, in place.

    ``mask`` is a bool array placed with its top-left corner at ``origin`` (x, y) and may stick
    out of the image (the outside part is ignored). Only the mask's rectangle is touched.

    Example:
        >>> img = np.zeros((4, 4, 3), np.uint8); m = np.zeros((2, 2), bool); m[0, 0] = True
        >>> blend(img, m, (0, 0, 200), 0.5, origin=(1, 1))
        >>> img[1, 1].tolist(), img[1, 2].tolist(), int(img.sum())
        ([0, 0, 100], [0, 0, 0], 100)
    """
    if alpha <= 0:
        return
    h, w = image.shape[:2]
    ox, oy = int(origin[0]), int(origin[1])
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + mask.shape[1], w), min(oy + mask.shape[0], h)
    if x1 <= x0 or y1 <= y0:
        return
    m = mask[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    if not m.any():
        return
    roi = image[y0:y1, x0:x1]
    # One affine pass (out = (1 - a) * pixel + a * color) over the rectangle, then a masked copy
    # back in place: both in OpenCV, about 10x faster than numpy broadcasting and where=.
    affine = np.zeros((3, 4), np.float32)
    affine[:, :3] = np.eye(3) * (1.0 - alpha)
    affine[:, 3] = np.asarray(color[:3], np.float32) * alpha
    mixed = cv2.transform(roi, affine)
    res = cv2.copyTo(mixed, m.view(np.uint8), roi)
    if not np.shares_memory(res, roi):  # OpenCV wrote to a new array: copy it back
        roi[...] = res


def draw_label(
    image: np.ndarray,
    text: str,
    anchor: tuple[float, float],
    color: BGR,
    *,
    scale: float | None = None,
    below: bool = False,
    padding: int | None = None,
) -> tuple[int, int, int, int]:
    """A text label on a filled box whose bottom-left corner is ``anchor`` (top-left if ``below``).

    The box is kept inside the image; the text is white or black, whichever reads better on
    ``color``. Returns the box as (x1, y1, x2, y2).

    Example:
        >>> img = np.zeros((60, 200, 3), np.uint8)
        >>> x1, y1, x2, y2 = draw_label(img, "#3", (5, 30), (255, 255, 255))
        >>> y2 == 30 and x1 == 5 and img[y1 + 1, x1 + 1].tolist() == [255, 255, 255]
        True
    """
    scale = text_scale(image) if scale is None else scale
    thick = max(1, round(scale * 2))
    pad = max(2, round(4 * scale)) if padding is None else padding
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    bw, bh = tw + 2 * pad, th + base + 2 * pad
    h, w = image.shape[:2]
    x = int(np.clip(round(anchor[0]), 0, max(w - bw, 0)))
    y_top = round(anchor[1]) if below else round(anchor[1]) - bh
    y = int(np.clip(y_top, 0, max(h - bh, 0)))
    cv2.rectangle(image, (x, y), (x + bw - 1, y + bh - 1), color, -1)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    cv2.putText(image, text, (x + pad, y + pad + th), FONT, scale, ink, thick, cv2.LINE_AA)
    return x, y, x + bw, y + bh


class RegionAnnotator:
    """Region polygons: translucent fill, outline and a ``name: count`` label.

    An occupied region is filled a little more strongly than an empty one.

    Example:
        >>> regions = [RegionConfig(id="table", polygon=[[10, 10], [50, 10], [50, 40], [10, 40]])]
        >>> img = np.full((60, 80, 3), 100, np.uint8)
        >>> out = RegionAnnotator(regions).annotate(img, {"table": 1})
        >>> out is img, bool(img[30, 30, 2] > 100 > img[30, 30, 0])   # inside: redder, less blue
        (True, True)
        >>> img[55, 75].tolist()                                  # outside: untouched
        [100, 100, 100]
    """

    def __init__(
        self,
        regions: Sequence[RegionConfig],
        *,
        color: BGR = REGION_COLOR,
        opacity: float = 0.25,
        occupied_opacity: float = 0.4,
        thickness: int = 2,
        show_count: bool = True,
    ):
        self.regions = list(regions)
        self.color = color
        self.opacity = opacity
        self.occupied_opacity = occupied_opacity
        self.thickness = thickness
        self.show_count = show_count
        self._polys = [np.round(np.asarray(r.polygon, np.float64)).astype(np.int32) for r in self.regions]
        self._masks: dict[str, tuple[tuple[int, int], np.ndarray]] = {}

    def _mask(self, i: int) -> tuple[tuple[int, int], np.ndarray]:
        """The polygon as a bool mask over its bounding rectangle, and that rectangle's origin."""
        rid = self.regions[i].id
        cached = self._masks.get(rid)
        if cached is None:
            poly = self._polys[i]
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            m = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
            cv2.fillPoly(m, [poly - (x0, y0)], 1)
            cached = self._masks[rid] = ((int(x0), int(y0)), m.astype(bool))
        return cached

    def annotate(self, image: np.ndarray, counts: Mapping[str, int] | None = None, *,
                 only: Iterable[str] | None = None, labels: bool = True) -> np.ndarray:
        """Draw the regions (or ``only`` those ids) with their counts; returns ``image``."""
        counts = counts or {}
        wanted = None if only is None else set(only)
        picked = [i for i, r in enumerate(self.regions) if wanted is None or r.id in wanted]
        for i in picked:
            n = int(counts.get(self.regions[i].id, 0))
            origin, mask = self._mask(i)
            blend(image, mask, self.color, self.occupied_opacity if n > 0 else self.opacity, origin)
        for i in picked:
            cv2.polylines(image, [self._polys[i]], True, self.color, self.thickness, cv2.LINE_AA)
        if self.show_count and labels:
            self.annotate_labels(image, counts, only=only)
        return image

    def annotate_labels(self, image: np.ndarray, counts: Mapping[str, int] | None = None, *,
                        only: Iterable[str] | None = None) -> np.ndarray:
        """Only the ``name: count`` labels (to draw them on top of everything else)."""
        counts = counts or {}
        wanted = None if only is None else set(only)
        for r, poly in zip(self.regions, self._polys):
            if wanted is None or r.id in wanted:
                top = poly[np.lexsort((poly[:, 0], poly[:, 1]))[0]]  # highest vertex, leftmost on ties
                draw_label(image, f"{r.id}: {int(counts.get(r.id, 0))}", (top[0], top[1]), self.color)
        return image


class PersonAnnotator:
    """Each person's mask (when the tracker gives one), box and track id, in the track's colour.

    Example:
        >>> img = np.zeros((100, 100, 3), np.uint8)
        >>> mask = np.zeros((100, 100), bool); mask[30:80, 40:60] = True
        >>> p = TrackedPerson(1, np.array([38.0, 28.0, 62.0, 82.0]), 0.9, mask)
        >>> _ = PersonAnnotator().annotate(img, [p])
        >>> color = ColorPalette.default().by_id(1)
        >>> img[50, 50].tolist() != [0, 0, 0], img[60, 38].tolist() == list(color)   # mask, box
        (True, True)
    """

    def __init__(self, palette: ColorPalette | None = None, *, thickness: int = 2, mask_opacity: float = 0.45,
                 show_labels: bool = True):
        self.palette = palette or ColorPalette.default()
        self.thickness = thickness
        self.mask_opacity = mask_opacity
        self.show_labels = show_labels

    def annotate(self, image: np.ndarray, people: Iterable[TrackedPerson],
                 labels: Mapping[int, str] | None = None) -> np.ndarray:
        """Draw ``people``; ``labels`` may add text after the id (e.g. the region they are in)."""
        people = list(people)
        for p in people:
            if p.mask is not None:
                self._mask(image, p.mask, self.palette.by_id(p.track_id))
        for p in people:
            color = self.palette.by_id(p.track_id)
            x1, y1, x2, y2 = (int(round(float(v))) for v in p.bbox[:4])
            cv2.rectangle(image, (x1, y1), (x2, y2), color, self.thickness, cv2.LINE_AA)
            if self.show_labels:
                extra = (labels or {}).get(p.track_id)
                draw_label(image, f"#{p.track_id}" + (f" {extra}" if extra else ""),
                           (x1 - self.thickness // 2, y1 - self.thickness // 2), color)
        return image

    def _mask(self, image: np.ndarray, mask: np.ndarray, color: BGR) -> None:
        mask = np.asarray(mask, bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = mask[y0:y1, x0:x1]
        blend(image, crop, color, self.mask_opacity, (int(x0), int(y0)))
        contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, color, 1, cv2.LINE_AA, offset=(int(x0), int(y0)))


@dataclass(frozen=True, slots=True)
class Banner:
    """One line of text shown until stream time ``until_pts``."""

    text: str
    color: BGR
    until_pts: float


def banner_for(t: RegionTransition, until_pts: float) -> Banner:
    """The banner announcing a transition.

    Example:
        >>> t = RegionTransition("exit", "hall", "table", 3, 120, 12.0, 0.0, (0, 0, 1, 1), (0, 1), 0.9, dwell_s=11.5)
        >>> banner_for(t, 14.0).text
        '#3 left table after 11.5 s'
    """
    if t.type == "entry":
        return Banner(f"#{t.track_id} entered {t.region}", ENTRY_COLOR, until_pts)
    dwell = f" after {t.dwell_s:.1f} s" if t.dwell_s is not None else ""
    lost = " (lost)" if t.reason == "track_lost" else ""
    return Banner(f"#{t.track_id} left {t.region}{dwell}{lost}", EXIT_COLOR, until_pts)


class BannerAnnotator:
    """Stacks banners in the top-right corner, newest first.

    Example:
        >>> img = np.zeros((120, 320, 3), np.uint8)
        >>> _ = BannerAnnotator().annotate(img, [Banner("#1 entered table", ENTRY_COLOR, 2.0)])
        >>> bool(img[:, 160:].any()), bool(img[:, :100].any())
        (True, False)
    """

    def __init__(self, *, margin: int = 8):
        self.margin = margin

    def annotate(self, image: np.ndarray, banners: Sequence[Banner]) -> np.ndarray:
        scale = text_scale(image) * 1.1
        y = self.margin
        w = image.shape[1]
        for b in reversed(banners):
            thick = max(1, round(scale * 2))
            pad = max(3, round(6 * scale))
            (tw, _), _ = cv2.getTextSize(b.text, FONT, scale, thick)
            x = w - self.margin - tw - 2 * pad
            _, _, _, y2 = draw_label(image, b.text, (x, y), b.color, scale=scale, below=True, padding=pad)
            y = y2 + self.margin // 2
        return image


@dataclass(frozen=True, slots=True)
class Scene:
    """What to draw on one frame: the people in view, region counts, recent banners."""

    camera: str
    frame: int
    pts_s: float
    people: tuple[TrackedPerson, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    inside: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    banners: tuple[Banner, ...] = ()


class SceneBuilder:
    """Follows one camera's pipeline results and gives the :class:`Scene` of every frame.

    Feed it what the pipeline observer gets: each frame, the tracker's update for that frame (or
    None between updates: the last known people stay on screen) and the region transitions it
    produced. Region counts follow the transitions, exactly as the daemon's occupancy does.

    Example:
        >>> regions = [RegionConfig(id="table", polygon=[[0, 0], [9, 0], [9, 9]])]
        >>> b = SceneBuilder(regions, banner_s=1.0)
        >>> f = Frame("hall", 7, 0.7, 0.0, np.zeros((10, 10, 3), np.uint8))
        >>> p = TrackedPerson(2, np.array([1.0, 1.0, 5.0, 8.0]), 0.8)
        >>> t = RegionTransition("entry", "hall", "table", 2, 5, 0.5, 0.0, (1, 1, 5, 8), (3, 8), 0.8)
        >>> s = b.observe(f, TrackUpdate(f, (p,)), [t])
        >>> s.counts, s.inside, [x.text for x in s.banners]
        ({'table': 1}, {2: ('table',)}, ['#2 entered table'])
        >>> f2 = Frame("hall", 30, 3.0, 0.0, f.image)
        >>> s2 = b.observe(f2, None, [])
        >>> len(s2.people), s2.banners
        (1, ())
    """

    def __init__(self, regions: Sequence[RegionConfig], *, banner_s: float = 2.0, max_banners: int = 4):
        self.region_ids = [r.id for r in regions]
        self.banner_s = banner_s
        self.max_banners = max_banners
        self._people: tuple[TrackedPerson, ...] = ()
        self._inside: dict[int, set[str]] = {}
        self._banners: deque[Banner] = deque(maxlen=max_banners)

    def observe(self, frame: Frame, update: TrackUpdate | None, transitions: Sequence[RegionTransition]) -> Scene:
        if update is not None:
            self._people = tuple(update.people)
        for t in transitions:
            regions = self._inside.setdefault(t.track_id, set())
            if t.type == "entry":
                regions.add(t.region)
            else:
                regions.discard(t.region)
                if not regions:
                    self._inside.pop(t.track_id, None)
            self._banners.append(banner_for(t, frame.pts_s + self.banner_s))
        while self._banners and self._banners[0].until_pts < frame.pts_s:
            self._banners.popleft()
        counts = {r: 0 for r in self.region_ids}
        for regions in self._inside.values():
            for r in regions:
                counts[r] = counts.get(r, 0) + 1
        inside = {tid: tuple(sorted(rs)) for tid, rs in self._inside.items()}
        return Scene(frame.camera, frame.index, frame.pts_s, self._people, counts, inside, tuple(self._banners))


class SceneAnnotator:
    """Draws a whole :class:`Scene`: regions, people, banners and a small clock line.

    ``annotate`` returns a new image and leaves the input alone (frames are shared between
    stages and must not be changed).
    """

    def __init__(self, regions: Sequence[RegionConfig], *, palette: ColorPalette | None = None,
                 show_clock: bool = True):
        self.regions = RegionAnnotator(regions)
        self.people = PersonAnnotator(palette)
        self.banners = BannerAnnotator()
        self.show_clock = show_clock

    def annotate(self, image: np.ndarray, scene: Scene) -> np.ndarray:
        out = image.copy()
        self.regions.annotate(out, scene.counts, labels=False)
        labels = {tid: "in " + ", ".join(rs) for tid, rs in scene.inside.items()}
        self.people.annotate(out, scene.people, labels)
        self.regions.annotate_labels(out, scene.counts)  # counts stay readable over boxes
        self.banners.annotate(out, scene.banners)
        if self.show_clock:
            m, s = divmod(max(scene.pts_s, 0.0), 60.0)
            text = f"{scene.camera}  {int(m):02d}:{s:04.1f}  frame {scene.frame}"
            draw_label(out, text, (0, out.shape[0]), (32, 32, 32), scale=text_scale(out) * 0.8)
        return out


class MaskMemory:
    """Recent tracker masks by (frame index, track id), cropped to their boxes, for snapshots.

    Entry events are decided a little after the frame they report (debounce), so the mask of
    the entry frame has to be remembered for a short while. Only updates that carry masks cost
    anything; entries older than ``keep_s`` of stream time are dropped.

    Example:
        >>> mem = MaskMemory(keep_s=1.0)
        >>> m = np.zeros((8, 8), bool); m[2:5, 3:6] = True
        >>> f = Frame("hall", 4, 0.4, 0.0, np.zeros((8, 8, 3), np.uint8))
        >>> mem.add(TrackUpdate(f, (TrackedPerson(1, np.array([3.0, 2, 6, 5]), 0.9, m),)))
        >>> bool((mem.get(4, 1) == m).all()), mem.get(4, 2), mem.get(3, 1)
        (True, None, None)
    """

    def __init__(self, keep_s: float = 3.0):
        self.keep_s = keep_s
        self._items: deque[tuple[float, int, dict[int, tuple[int, int, np.ndarray]]]] = deque()
        self._shape: tuple[int, int] = (0, 0)

    def add(self, update: TrackUpdate) -> None:
        crops = {}
        for p in update.people:
            if p.mask is None:
                continue
            mask = np.asarray(p.mask, bool)
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size:
                crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
                crops[p.track_id] = (int(cols[0]), int(rows[0]), crop)
        pts = update.frame.pts_s
        while self._items and self._items[0][0] < pts - self.keep_s:
            self._items.popleft()
        if crops:
            self._shape = update.frame.image.shape[:2]
            self._items.append((pts, update.frame.index, crops))

    def get(self, frame: int, track_id: int) -> np.ndarray | None:
        """The full-size HxW mask of ``track_id`` at ``frame``, if remembered."""
        for _, idx, crops in reversed(self._items):
            if idx == frame:
                hit = crops.get(track_id)
                if hit is None:
                    return None
                x, y, crop = hit
                full = np.zeros(self._shape, bool)
                full[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
                return full
            if idx < frame:
                break
        return None


def render_snapshot(
    image: np.ndarray,
    t: RegionTransition,
    regions: Sequence[RegionConfig],
    *,
    mask: np.ndarray | None = None,
    palette: ColorPalette | None = None,
) -> np.ndarray:
    """The entry snapshot: the event's region and that person's box (and mask), on a copy.

    Example:
        >>> regions = [RegionConfig(id="table", polygon=[[10, 10], [90, 10], [90, 60], [10, 60]])]
        >>> t = RegionTransition("entry", "hall", "table", 1, 0, 0.0, 0.0, (20, 5, 50, 55), (35, 55), 0.9)
        >>> img = np.full((80, 120, 3), 128, np.uint8)
        >>> out = render_snapshot(img, t, regions)
        >>> out[5, 35].tolist() == list(ColorPalette.default().by_id(1)), bool(img.mean() == 128)
        (True, True)
    """
    out = image.copy()
    RegionAnnotator(regions, show_count=False).annotate(out, {t.region: 1}, only=[t.region])
    person = TrackedPerson(t.track_id, np.asarray(t.bbox, np.float64), t.score, mask)
    PersonAnnotator(palette).annotate(out, [person], {t.track_id: f"entered {t.region}"})
    return out


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """BGR image → JPEG bytes.

    Example:
        >>> encode_jpeg(np.zeros((8, 8, 3), np.uint8))[:2]
        b'\\xff\\xd8'
    """
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
