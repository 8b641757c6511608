"""The two inference engines, one signature: run(todo, settings, journal, header) -> model inputs run.

local.py runs in this process (reader thread, model streams, writer thread); ray_pool.py on a Ray Data actor
pool (imported only for --engine ray: the local engine never imports Ray)."""
