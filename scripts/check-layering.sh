#!/usr/bin/env bash
# Checks the module dependency rules: the table in src/lib.rs (the one edge list) for
# every `crate::` path, grouped and multi-line `use crate::{…}` imports included; that
# only src/fuse/ imports fuser; that `unsafe` appears only in src/sys/; and that
# src/crypto/ and src/content/ do no I/O outside their tests.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import pathlib, re, sys

root = pathlib.Path("src")
fail = []

# --- the edge list, from src/lib.rs ------------------------------------------------
allowed, names_only = {}, {}
for line in (root / "lib.rs").read_text().splitlines():
    m = re.match(r"//! \| (\w+) \| (.*?) ?\|$", line)
    if not m or m.group(1) == "module":
        continue
    row = m.group(2)
    # "fs (CONFIG_NAME, CONFIG_TMP_NAME only)": fs, for those names only.
    for dep, names in re.findall(r"(\w+) \(([^)]*)\)", row):
        names_only.setdefault(m.group(1), {})[dep] = set(re.findall(r"[A-Z_]{2,}", names))
    row = re.sub(r"\([^)]*\)", "", row)
    allowed[m.group(1)] = {p.strip() for p in row.split(",") if p.strip()}
if not allowed:
    sys.exit("layering: no module table found in src/lib.rs")

def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)

def without_tests(text):
    """The code without its `#[cfg(test)]` items (modules and functions)."""
    out, at = "", 0
    for m in re.finditer(r"#\[cfg\(test\)\][^{;]*", text):
        if m.start() < at:
            continue
        out += text[at : m.start()]
        end = m.end()
        if end < len(text) and text[end] == "{":
            end += len(brace_group(text, end)) + 2
        at = end
    return out + text[at:]

def brace_group(text, start):
    """The text inside the braces opening at text[start] (balanced)."""
    depth, i = 0, start
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
        i += 1
    return text[start + 1 :]

def top_level(group):
    out, depth, cur = [], 0, ""
    for ch in group:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]

def uses(text):
    """(module, rest of path) for every crate:: path in the code."""
    for m in re.finditer(r"\bcrate\s*::\s*", text):
        at = m.end()
        if text.startswith("{", at):
            for item in top_level(brace_group(text, at)):
                head, _, rest = item.partition("::")
                yield head.strip(), rest + " " + item
        else:
            w = re.match(r"(\w+)(\s*::\s*(\{[^}]*\}|\w+))?", text[at:])
            if w:
                yield w.group(1), w.group(0)

for f in sorted(root.rglob("*.rs")):
    mod = f.relative_to(root).parts[0].removesuffix(".rs")
    if mod not in allowed:
        continue
    code = strip_comments(f.read_text())
    for dep, path in uses(code):
        if dep in (mod, "self", "super") or not re.fullmatch(r"[a-z_]+", dep):
            continue
        if dep not in allowed[mod]:
            fail.append(f"src/{mod} may not use crate::{dep} ({f})")
        elif dep in names_only.get(mod, {}):
            names = set(re.findall(r"\b[A-Za-z_]\w*\b", path)) - {dep}
            if not names or not names <= names_only[mod][dep]:
                fail.append(f"src/{mod} may use crate::{dep} only for {sorted(names_only[mod][dep])} ({f}: {path.strip()})")
    if "fuser::" in code and mod != "fuse":
        fail.append(f"only src/fuse/ may import fuser ({f})")
    if mod != "sys" and re.search(r"\bunsafe\b", code.replace("deny(unsafe_code)", "")):
        fail.append(f"unsafe outside src/sys/ ({f})")
    if mod in ("crypto", "content"):
        io = re.findall(
            r"\bstd\s*::\s*(?:fs|net|process|os)\b|\bstd::io::(?:Read|Write|Seek|stdin|stdout|stderr)\b|\b(?:File|OpenOptions|TcpStream|UdpSocket|Command)\s*::|\b(?:libc|rustix)\s*::|\bcrate::sys::(?!aes_x86|thread_cpu_time)\w+",
            without_tests(code))
        if io:
            fail.append(f"src/{mod} does no I/O, but {f} uses {sorted(set(io))}")

for m in fail:
    print("layering:", m)
if fail:
    sys.exit("layering check FAILED")
print("layering check passed")
PY
