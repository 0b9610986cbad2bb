"""The service's one web page: identities, a prompt with its controls, progress, images, past jobs.

Self-contained (`page.html`: no build step, no external assets). Progress comes from the job's
event stream, read with `fetch` so that an API key can be sent as a header (EventSource cannot).
The controls' ranges and defaults are the request schema's (`REQUEST_PARAMS`), injected here.
"""

import json
from dataclasses import asdict
from pathlib import Path

from ..runtime.sampling.params import RECIPES, REQUEST_PARAMS, REQUIRED

SCHEMA = {
    "params": {
        p.name: {
            "lo": p.lo,
            "hi": p.hi,
            "default": None if p.default is REQUIRED else p.default,
            "step": p.multiple_of if p.kind == "int" else "any",
            "choices": list(p.choices),
            "help": p.help,
        }
        for p in REQUEST_PARAMS
    },
    "recipes": {name: asdict(recipe.guidance) for name, recipe in RECIPES.items()},
}
HTML = (Path(__file__).resolve().parent / "page.html").read_text(encoding="utf-8")
PAGE = HTML.replace("/*SCHEMA*/null", json.dumps(SCHEMA).replace("</", "<\\/"))
