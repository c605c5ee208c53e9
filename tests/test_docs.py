"""Every command the operator docs show is run here.

Each ``sh`` block of the docs below runs, in order, as one bash script per
page, verbatim but for the guests' names (``web1`` → ``gt-web1``: test guests
are ``gt-*``) and the example database host. The scripts run in a private
mount namespace where /etc/gasnap, /run/gasnap, /var/lib/gasnap, /opt/gasnap
and /etc/systemd/system are directories of the test's own (the lab guests'
files stay where libvirtd sees them), so the docs' real paths are used and the
host's are left alone. An HTML comment before a block changes how it runs:

* ``<!-- doc-test: background -->``: each line is a service; started in the
  background, waited for until it listens, stopped when the page ends;
* ``<!-- doc-test: file PATH -->``: the block is the content of PATH;
* ``<!-- doc-test: skip REASON -->``: not run here, for REASON;
* ``<!-- doc-test: expect REGEX -->``: run, and what the block prints must
  match REGEX (Python syntax, multi-line: ``^`` and ``$`` at each line): the
  output the page promises, not only an exit code.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import URI
from gasnap.apidoc import render
from gasnap.lab.guests import Lab
from gasnap.virt import LibvirtHypervisor
from pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# The order matters: later pages use the guests and state earlier ones made.
PAGES = ["install.md", "quickstart.md", "snapshots.md", "clones.md", "schedules.md",
         "configuration.md",
         "metadata.md", "nova.md", "observability.md", "index.md", "recovery.md", "lab.md",
         "qmp.md"]
GUESTS = {"web1": "gt-web1", "db1": "gt-db1"}
SANDBOXED = ["/etc/gasnap", "/run/gasnap", "/var/lib/gasnap", "/opt/gasnap",
             "/etc/systemd/system"]
FENCE = re.compile(r"(?:<!-- doc-test: (?P<mode>\w+) ?(?P<arg>[^>]*?) ?-->\n)?"
                   r"```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    page: str
    lang: str
    mode: str  # run | background | file | skip
    arg: str
    body: str


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        mode = match["mode"] or ("run" if match["lang"] == "sh" else "show")
        if mode == "show":
            continue
        found.append(Block(page, match["lang"], mode, match["arg"] or "", match["body"]))
    return found


def test_api_page_is_generated_from_the_documents() -> None:
    assert (DOCS / "api.md").read_text() == render(), "run: python -m gasnap.apidoc > docs/api.md"


def test_every_shell_block_of_every_page_is_covered() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    for page in pages - set(PAGES):
        assert not [b for b in blocks(page) if b.lang == "sh"], f"{page} is not run"
    for block in (b for page in PAGES for b in blocks(page)):
        assert block.mode in ("run", "background", "file", "skip", "expect"), block
        if block.mode == "skip":
            assert block.arg.strip(), f"{block.page}: a skipped block must say why"


# --- the runner ------------------------------------------------------------------------


def _lines(body: str) -> list[str]:
    """Commands, with backslash continuations joined."""
    return [line for line in body.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _listen(command: str) -> str:
    words = shlex.split(command)
    if "--listen" in words:
        return words[words.index("--listen") + 1]
    if words[:3] == ["gasnap", "metadata", "serve"]:
        return "unix:/run/gasnap/metadata.sock"
    return "unix:/run/gasnap/api.sock"


def script(page: str, sandbox: Path) -> str:
    out = [
        "set -euxo pipefail",
        # Each sandboxed path: a directory of the test's, bound over the real one.
        *(f"mkdir -p {path} {sandbox}{path}" for path in SANDBOXED),
        f"mkdir -p /var/lib/gasnap/lab {sandbox}/lab-real",
        f"mount --bind /var/lib/gasnap/lab {sandbox}/lab-real",
        *(f"mount --bind {sandbox}{path} {path}" for path in SANDBOXED),
        "mkdir -p /var/lib/gasnap/lab",
        f"mount --bind {sandbox}/lab-real /var/lib/gasnap/lab",
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
        f"cd {ROOT}",
        f"export PATH={ROOT}/.venv/bin:$PATH",
    ]
    for number, block in enumerate(blocks(page)):
        body = block.body
        for name, test_name in GUESTS.items():
            body = re.sub(rf"\b{name}\b", test_name, body)
        if block.mode == "file":
            out += [f"cat > {block.arg.strip()} <<'GASNAP_DOC_EOF'", body.rstrip("\n"),
                    "GASNAP_DOC_EOF"]
        elif block.mode == "background":
            for index, command in enumerate(_lines(body)):
                kind = "agent" if command.startswith("gasnap serve") else ""
                out += [f"{command} > {sandbox}/{page}-{number}-{index}.log 2>&1 &",
                        f"python {ROOT}/tests/docwait.py {_listen(command)} {kind}"]
        elif block.mode == "run":
            out.append(body)
        elif block.mode == "expect":
            printed = f"{sandbox}/{page}-{number}.out"
            out += ["{", body.rstrip("\n"), f"}} > {printed}", f"cat {printed}",
                    f"python {ROOT}/tests/docexpect.py {shlex.quote(block.arg)} {printed}"]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, postgres: Cluster) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("docs")
    url = postgres.new_database()  # the examples' PostgreSQL: a private cluster
    (base / "pg-url").write_text(url)
    # The mount points the scripts create on the host, removed again if empty.
    absent = [Path(p) for p in SANDBOXED if not Path(p).exists()]
    yield base
    for path in absent:
        with contextlib.suppress(OSError):
            path.rmdir()


@pytest.fixture(scope="module")
async def doc_guests(hv: LibvirtHypervisor) -> AsyncIterator[None]:
    yield None
    lab = Lab(hv)
    for name in GUESTS.values():
        if name in await lab.names():
            await lab.down(name)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page: str, sandbox: Path, doc_guests: None, postgres: Cluster) -> None:
    text = script(page, sandbox)
    text = text.replace("postgresql://gasnap@db.example:5432/gasnap",
                        (sandbox / "pg-url").read_text())
    (sandbox / f"{page}.sh").write_text(text)
    env = {"TOKEN": "doc-t0ken", "META_TOKEN": "doc-meta-t0ken", "HOME": str(sandbox),
           "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LIBVIRT_DEFAULT_URI": URI}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash",
                           str(sandbox / f"{page}.sh")], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    assert proc.returncode == 0, f"{page}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
