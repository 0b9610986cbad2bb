"""The service's one web page: upload faces, type a prompt, watch the progress, see the images.

Self-contained (`page.html`: no build step, no external assets). Progress comes from the job's
event stream, read with `fetch` so that an API key can be sent as a header (EventSource cannot).
"""

from pathlib import Path

PAGE = (Path(__file__).resolve().parent / "page.html").read_text(encoding="utf-8")
