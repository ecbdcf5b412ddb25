"""The embedded default data set: synthetic multimodal items and user histories.

Items have a title, a description, structured attributes (category, brand, colour, material,
price) and a small PIL-drawn image whose look follows the attributes: the shape shows the
category, the fill the colour, the texture the material, the border the brand.

Users are drawn from a latent model in which both kinds of signal a Molar-style model must
combine matter:
- content: each user has a taste over attribute values, so items that *look* alike (attributes,
  text, image) are chosen by the same users;
- collaborative/sequential: every item has a few fixed successor items, picked at random and so
  invisible in content; with probability ``transition_prob`` the next item is a successor of
  the current one. Only an ID/sequence model can learn these transitions.
- popularity skew: a Zipf-like item bias (``popularity_exponent``) added to the taste logits.

Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same params give the
same tables and the same image bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from molar.config import DataParams
from molar.errors import UserError
from molar.data.schema import IngestReport, attributes_json, make_interactions, make_items

CATEGORIES = ["shirt", "mug", "lamp", "backpack", "sneaker", "notebook"]
COLOURS = {
    "red": (200, 40, 40),
    "orange": (235, 140, 30),
    "yellow": (230, 210, 40),
    "green": (50, 160, 70),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "black": (30, 30, 30),
}
MATERIALS = ["cotton", "steel", "oak", "leather", "recycled plastic"]
BRANDS = ["Nordia", "Kestrel", "Umbra", "Solace", "Fjord", "Pinecrest", "Aurel", "Vantage"]
BRAND_BORDERS = [(0, 0, 0), (120, 120, 120), (255, 255, 255), (90, 60, 20), (0, 90, 160), (160, 0, 80), (0, 120, 0), (200, 170, 0)]
BASE_PRICE = {"shirt": 25.0, "mug": 12.0, "lamp": 60.0, "backpack": 80.0, "sneaker": 95.0, "notebook": 8.0}
MATERIAL_FACTOR = {"cotton": 1.0, "steel": 1.6, "oak": 1.4, "leather": 2.2, "recycled plastic": 0.8}
ADJECTIVES = ["classic", "compact", "everyday", "premium", "minimal", "rugged", "soft", "bold"]


def _shape(draw: ImageDraw.ImageDraw, category: str, box: tuple[int, int, int, int], fill, outline, width: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if category == "shirt":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif category == "mug":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif category == "lamp":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    elif category == "backpack":
        draw.rounded_rectangle(box, radius=(x1 - x0) // 4, fill=fill, outline=outline, width=width)
    elif category == "sneaker":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline, width=width)
    else:  # notebook: a hexagon
        w, h = (x1 - x0) / 2, (y1 - y0) / 2
        pts = [(cx + w * np.cos(a), cy + h * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def _texture(draw: ImageDraw.ImageDraw, material: str, size: int) -> None:
    light = (255, 255, 255)
    step = max(size // 8, 3)
    if material == "steel":  # horizontal stripes
        for y in range(0, size, step):
            draw.line([(0, y), (size, y)], fill=light, width=1)
    elif material == "oak":  # vertical grain
        for x in range(0, size, step):
            draw.line([(x, 0), (x, size)], fill=(120, 80, 40), width=1)
    elif material == "leather":  # dots
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.point((x, y), fill=light)
    elif material == "recycled plastic":  # diagonal lines
        for o in range(-size, size, step):
            draw.line([(o, 0), (o + size, size)], fill=light, width=1)
    # cotton: plain


def draw_item_image(attrs: dict, size: int) -> Image.Image:
    """A small picture whose look follows the item's attributes."""
    img = Image.new("RGB", (size, size), (235, 235, 230))
    layer = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(layer)
    margin = size // 8
    border = BRAND_BORDERS[BRANDS.index(attrs["brand"])]
    _shape(draw, attrs["category"], (margin, margin, size - margin, size - margin), COLOURS[attrs["colour"]], border, max(size // 20, 1))
    mask = Image.new("L", (size, size), 0)
    _shape(ImageDraw.Draw(mask), attrs["category"], (margin, margin, size - margin, size - margin), 255, 255, 1)
    _texture(draw, attrs["material"], size)
    img.paste(layer, (0, 0), mask)
    # the brand's border colour also frames the picture, so it stays visible whatever the shape
    ImageDraw.Draw(img).rectangle((0, 0, size - 1, size - 1), outline=border, width=max(size // 28, 1))
    return img


def _items(rng: np.random.Generator, n_items: int) -> list[dict]:
    items = []
    for i in range(n_items):
        attrs = {
            "category": CATEGORIES[rng.integers(len(CATEGORIES))],
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "material": MATERIALS[rng.integers(len(MATERIALS))],
            "brand": BRANDS[rng.integers(len(BRANDS))],
        }
        price = BASE_PRICE[attrs["category"]] * MATERIAL_FACTOR[attrs["material"]] * float(rng.uniform(0.8, 1.25))
        attrs["price"] = round(price, 2)
        adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))]
        title = f"{attrs['brand']} {adjective} {attrs['colour']} {attrs['material']} {attrs['category']}"
        description = (
            f"A {adjective} {attrs['category']} by {attrs['brand']}, made of {attrs['material']} "
            f"in {attrs['colour']}. Priced at ${attrs['price']:.2f}."
        )
        items.append({"item_id": f"i{i:05d}", "title": title, "description": description, "attrs": attrs})
    return items


def _one_hot_content(items: list[dict]) -> np.ndarray:
    vocab = [("category", v) for v in CATEGORIES] + [("colour", v) for v in COLOURS]
    vocab += [("material", v) for v in MATERIALS] + [("brand", v) for v in BRANDS]
    index = {kv: j for j, kv in enumerate(vocab)}
    x = np.zeros((len(items), len(vocab)))
    for i, it in enumerate(items):
        for key in ("category", "colour", "material", "brand"):
            x[i, index[(key, it["attrs"][key])]] = 1.0
    return x


def _histories(rng: np.random.Generator, items: list[dict], cfg) -> list[list[int]]:
    n = len(items)
    content = _one_hot_content(items)
    popularity = -cfg.popularity_exponent * np.log1p(rng.permutation(n))  # Zipf-like bias
    successors = np.stack([rng.choice(n, size=cfg.successors_per_item, replace=False) for _ in range(n)])
    histories = []
    for _ in range(cfg.n_users):
        # a taste concentrated on a few attribute values: sparse positive preferences
        taste = rng.standard_normal(content.shape[1]) * (rng.random(content.shape[1]) < 0.3) * 3.0
        logits = (content @ taste) / cfg.taste_temperature + popularity
        length = int(rng.integers(cfg.min_length, cfg.max_length + 1))
        seen = np.zeros(n, dtype=bool)
        history: list[int] = []
        while len(history) < min(length, n):
            nxt = -1
            if history and rng.random() < cfg.transition_prob:
                candidates = [s for s in successors[history[-1]] if not seen[s]]
                if candidates:
                    nxt = int(candidates[rng.integers(len(candidates))])
            if nxt < 0:
                masked = np.where(seen, -np.inf, logits)
                p = np.exp(masked - masked.max())
                nxt = int(rng.choice(n, p=p / p.sum()))
            seen[nxt] = True
            history.append(nxt)
        histories.append(history)
    return histories


def generate(
    cfg: DataParams, seed: int, image_dir: Path, report: IngestReport, recorded_dir: Path | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate the synthetic catalog and interactions.

    Images are written to ``image_dir``; ``image_path`` records them under ``recorded_dir``
    (default ``image_dir``), so a stage can write into a temporary folder that it renames later.
    """
    syn = cfg.synthetic
    if syn.min_length > syn.max_length:
        raise UserError(f"data.synthetic.min_length ({syn.min_length}) must be <= max_length ({syn.max_length})")
    rng = np.random.default_rng(seed)
    items = _items(rng, syn.n_items)
    histories = _histories(rng, items, syn)

    image_dir.mkdir(parents=True, exist_ok=True)
    item_rows = []
    for it in items:
        name = f"{it['item_id']}.png"
        draw_item_image(it["attrs"], syn.image_size).save(image_dir / name, format="PNG")
        report.items_with_image += 1
        item_rows.append(
            {
                "item_id": it["item_id"],
                "title": it["title"],
                "description": it["description"],
                "attributes": attributes_json(it["attrs"]),
                "image_path": str((recorded_dir or image_dir) / name),
            }
        )

    rows = []
    t0 = 1_700_000_000
    for u, history in enumerate(histories):
        t = t0 + int(rng.integers(0, 86_400 * 30))
        for i in history:
            t += int(rng.integers(60, 86_400))
            rows.append((f"u{u:05d}", items[i]["item_id"], t))
    report.rows_read = len(rows)
    return make_items(item_rows), make_interactions(rows)
