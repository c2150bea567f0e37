"""Build offline.html, the page template `dvc plots show` fills (.dvc/config: plots.html_template), with
Vega, Vega-Lite and Vega-Embed inlined, so the page renders without a network (DVC's own template loads
them from a CDN). The libraries come from the npm registry at the versions DVC's renderer names, each
tarball checked against its sha256 (`make plots-template` runs this; it needs npm).

    python .dvc/plots/vendor.py
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# package@version -> (the tarball's sha256, the built file inside it)
LIBRARIES = {
    "vega@5.20.2": ("d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d",
                    "package/build/vega.min.js"),
    "vega-lite@5.2.0": ("f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b",
                        "package/build/vega-lite.min.js"),
    "vega-embed@6.18.2": ("93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b",
                          "package/build/vega-embed.min.js"),
}  # fmt: skip
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>garden: DVC plots</title>
    <!-- Vega, Vega-Lite and Vega-Embed inlined by .dvc/plots/vendor.py (BSD-3-Clause, University of
         Washington Interactive Data Lab): no script is loaded from the network. -->
{libraries}
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> None:
    scripts = []
    with tempfile.TemporaryDirectory() as folder:
        for spec, (sha256, member) in LIBRARIES.items():
            name = subprocess.run(["npm", "pack", spec, "--silent"], cwd=folder, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]  # fmt: skip
            tarball = Path(folder) / name
            found = hashlib.sha256(tarball.read_bytes()).hexdigest()
            if found != sha256:
                raise SystemExit(f"{spec}: sha256 {found} is not the pinned {sha256}")
            with tarfile.open(tarball) as archive:
                code = archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            if "</script" in code:
                raise SystemExit(f"{spec}: {member} cannot be inlined (it contains '</script')")
            scripts.append(f"    <!-- {spec} -->\n    <script>{code}</script>")
    page = PAGE.replace("{libraries}", "\n".join(scripts))  # str.replace: the code's braces stay as they are
    (HERE / "offline.html").write_text(page, encoding="utf-8")
    print(f"wrote {HERE / 'offline.html'} ({len(page) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
