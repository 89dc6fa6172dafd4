"""Imported first by the workers' forkserver (unison.startup.PRELOAD), and only there: the
forkserver dies with the process that started it, even while it is still importing torch."""

from .startup import watch_parent

watch_parent()
