"""Figures drawn with PIL alone, train.py's metrics.png and the experiments': labeled rows of images, and line
plots. Each function returns a PIL image; save() writes one or more side by side as a PNG."""
import math
import os

from PIL import Image, ImageDraw, ImageFont

FONT = ImageFont.load_default(size=11)
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def image_grid(rows, row_labels, col_labels, scale=2):
    """Rows of (3, H, W) image tensors in [0, 1], each enlarged scale times (nearest), labels left and on top."""
    cell = rows[0][0].shape[-1] * scale
    left = 8 + max(int(FONT.getlength(label)) for label in row_labels)
    top = 18
    sheet = Image.new("RGB", (left + cell * max(map(len, rows)), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):
        draw.text((left + j * cell + 2, 3), label, fill="black", font=FONT)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        draw.text((4, top + i * cell + cell // 2 - 6), label, fill="black", font=FONT)
        for j, image in enumerate(row):
            pixels = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
            sheet.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
    return sheet


def line_plot(xs, series, xlabel, ylabel, ylim=(None, None), log_y=False, size=(640, 300), intervals=None):
    """One or more series ({name: ys}) over xs: axes with 5 ticks each, the legend to the right. ylim's None ends
    fit the data with 5% room; log_y: a log10 y axis (ylim then still in data units). intervals: {name: [(lo, hi)
    at each x]}, drawn as error bars, each series' a little to the side of the others'."""
    w, h = size
    x0, y0, x1, y1 = 60, 28, w - 170, h - 45  # plot area
    axis = math.log10 if log_y else (lambda y: y)
    intervals = intervals or {}
    ys = [axis(y) for values in series.values() for y in values] + \
        [axis(y) for bars in intervals.values() for bar in bars for y in bar if math.isfinite(y)]
    room = 0.05 * (max(ys) - min(ys)) or 1
    lo = min(ys) - room if ylim[0] is None else axis(ylim[0])
    hi = max(ys) + room if ylim[1] is None else axis(ylim[1])
    px = lambda x: x0 + (x - min(xs)) / ((max(xs) - min(xs)) or 1) * (x1 - x0)  # noqa: E731
    py = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for k in range(5):
        x = min(xs) + k / 4 * (max(xs) - min(xs))
        y = lo + k / 4 * (hi - lo)
        draw.text((px(x) - 10, y1 + 4), f"{x:.3g}", fill="black", font=FONT)
        draw.text((4, py(y) - 6), f"{10 ** y if log_y else y:.3g}", fill="black", font=FONT)
    draw.text(((x0 + x1) // 2 - 60, h - 20), xlabel, fill="black", font=FONT)
    draw.text((x0, 6), ylabel, fill="black", font=FONT)
    for k, (name, values) in enumerate(series.items()):
        draw.line([(px(x), py(axis(y))) for x, y in zip(xs, values)], fill=COLORS[k], width=2)
        for x, bar in zip(xs, intervals.get(name, [])):
            if not all(map(math.isfinite, bar)):  # one seed: no interval
                continue
            bx = px(x) + 4 * (k - (len(series) - 1) / 2)
            draw.line([(bx, py(axis(bar[0]))), (bx, py(axis(bar[1])))], fill=COLORS[k], width=1)
            for y in bar:
                draw.line([(bx - 2, py(axis(y))), (bx + 2, py(axis(y)))], fill=COLORS[k], width=1)
        draw.line([(x1 + 10, y0 + 12 + 16 * k), (x1 + 30, y0 + 12 + 16 * k)], fill=COLORS[k], width=2)
        draw.text((x1 + 36, y0 + 5 + 16 * k), name, fill="black", font=FONT)
    return sheet


def save(path, *panels, columns=None):
    """The panels side by side, top-aligned, `columns` to a row (default: all in one), as one PNG at path (its
    folder made if missing)."""
    columns = columns or len(panels)
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    sheet = Image.new("RGB", (max(sum(p.width for p in row) for row in rows),
                              sum(max(p.height for p in row) for row in rows)), "white")
    top = 0
    for row in rows:
        for i, panel in enumerate(row):
            sheet.paste(panel, (sum(p.width for p in row[:i]), top))
        top += max(p.height for p in row)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path + ".tmp.png", optimize=True)
    os.replace(path + ".tmp.png", path)  # whole or not at all: a figure redrawn as a run goes survives its crash
    return path
