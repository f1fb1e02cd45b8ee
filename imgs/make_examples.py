"""Draw the example illustrations in this folder (our own work, CC0; see LICENSE.md).

Run ``python imgs/make_examples.py`` to recreate them. They are simple flat-colour, line-art and
shading pictures, so every stage of the "undo" process (sketch, lines, flats, shading) has
something to remove.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def _shade(img: Image.Image, box, top, bottom) -> None:
    """Vertical gradient fill of ``box``."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 1, y1 - y0)[:, None, None]
    grad = (np.array(top)[None, None] * (1 - t) + np.array(bottom)[None, None] * t).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(grad, x1 - x0, axis=1)), (x0, y0))


def girl_with_umbrella() -> Image.Image:
    img = Image.new("RGB", (512, 640), (250, 246, 238))
    _shade(img, (0, 0, 512, 420), (180, 210, 240), (235, 240, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 420, 512, 640), fill=(150, 190, 120))
    d.pieslice((96, 70, 416, 330), 180, 360, fill=(220, 80, 90), outline=(40, 30, 40), width=4)  # umbrella
    for x in (136, 196, 256, 316, 376):
        d.line((256, 200, x, 200), fill=(40, 30, 40), width=2)
    d.line((256, 200, 256, 430), fill=(60, 50, 50), width=5)
    d.ellipse((196, 230, 316, 350), fill=(255, 224, 200), outline=(40, 30, 40), width=4)  # face
    d.chord((186, 215, 326, 330), 180, 360, fill=(90, 60, 50), outline=(40, 30, 40), width=4)  # hair
    d.ellipse((226, 285, 242, 301), fill=(60, 90, 160))
    d.ellipse((270, 285, 286, 301), fill=(60, 90, 160))
    d.arc((240, 310, 272, 330), 20, 160, fill=(150, 60, 60), width=3)
    d.polygon([(206, 350), (306, 350), (346, 560), (166, 560)], fill=(70, 110, 190), outline=(40, 30, 40))
    d.polygon([(256, 350), (306, 350), (346, 560), (276, 560)], fill=(55, 90, 160))  # dress shading
    return img.filter(ImageFilter.SMOOTH)


def cat_on_cushion() -> Image.Image:
    img = Image.new("RGB", (640, 512), (245, 235, 220))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((90, 330, 550, 470), radius=50, fill=(160, 70, 90), outline=(50, 30, 40), width=5)
    d.ellipse((180, 200, 460, 400), fill=(240, 170, 80), outline=(50, 30, 40), width=5)  # body
    d.ellipse((250, 110, 390, 250), fill=(240, 170, 80), outline=(50, 30, 40), width=5)  # head
    d.polygon([(262, 150), (280, 80), (310, 130)], fill=(240, 170, 80), outline=(50, 30, 40))
    d.polygon([(330, 130), (360, 80), (378, 150)], fill=(240, 170, 80), outline=(50, 30, 40))
    for x in (290, 350):
        d.arc((x - 14, 170, x + 14, 195), 200, 340, fill=(50, 30, 40), width=4)  # closed eyes
    for i in range(3):
        d.arc((200 + 60 * i, 230, 260 + 60 * i, 300), 200, 330, fill=(200, 120, 50), width=6)  # stripes
    d.chord((180, 300, 460, 400), 0, 180, fill=(215, 145, 65))  # shadow
    return img.filter(ImageFilter.SMOOTH)


def lighthouse() -> Image.Image:
    img = Image.new("RGB", (448, 640), (255, 255, 255))
    _shade(img, (0, 0, 448, 460), (250, 190, 140), (120, 140, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 460, 448, 640), fill=(60, 90, 140))
    for y in range(480, 640, 22):
        d.line((20, y, 428, y + 6), fill=(110, 140, 190), width=3)
    d.polygon([(190, 160), (258, 160), (284, 470), (164, 470)], fill=(245, 245, 240), outline=(40, 40, 50))
    for y0 in (220, 320, 420):
        d.polygon([(190 - (y0 - 160) // 12, y0), (258 + (y0 - 160) // 12, y0),
                   (262 + (y0 - 160) // 12, y0 + 40), (186 - (y0 - 160) // 12, y0 + 40)], fill=(200, 60, 60))
    d.rectangle((196, 110, 252, 160), fill=(255, 230, 120), outline=(40, 40, 50), width=4)
    d.polygon([(186, 110), (224, 70), (262, 110)], fill=(70, 60, 70))
    d.polygon([(252, 130), (448, 60), (448, 200)], fill=(255, 240, 170))  # light beam
    return img.filter(ImageFilter.SMOOTH)


def main() -> None:
    for name, draw in (("1.png", girl_with_umbrella), ("2.png", cat_on_cushion), ("3.png", lighthouse)):
        draw().save(HERE / name, optimize=True)


if __name__ == "__main__":
    main()
