#!/usr/bin/env python3
"""The metadata job: create, stat, readdir and unlink COUNT empty files under DIR.

    python3 scripts/lib/metadata-job.py DIR COUNT

The files go into ten subdirectories of DIR/metadata-job (made and removed by the
job). Each phase is timed on its own, the wall clock of this one process:

- create:  open(O_CREAT|O_EXCL|O_WRONLY) and close of each file;
- stat:    lstat of each file, by path, after the caches of the file system under test
           had them (the kernel keeps the inodes it created);
- readdir: a listing (os.scandir) of every subdirectory, names and types only;
- unlink:  unlink of each file (the subdirectories are removed untimed).

Prints one JSON line: {"create_s": .., "stat_s": .., "readdir_s": .., "unlink_s": ..,
"files": COUNT}. Standard library only; exits 2 on bad arguments, 1 if a phase fails
or finds a different number of files than it made.
"""

import json
import os
import shutil
import sys
import time

DIRS = 10


def main(argv):
    if len(argv) != 3 or not argv[2].isdigit() or int(argv[2]) < 1:
        print("usage: metadata-job.py DIR COUNT (COUNT >= 1)", file=sys.stderr)
        return 2
    base, count = argv[1], int(argv[2])
    if not os.path.isdir(base):
        print(f"metadata-job.py: {base}: not a directory", file=sys.stderr)
        return 2
    root = os.path.join(base, "metadata-job")
    if os.path.lexists(root):
        shutil.rmtree(root)
    os.mkdir(root)
    dirs = [os.path.join(root, f"d{i}") for i in range(DIRS)]
    for d in dirs:
        os.mkdir(d)
    paths = [os.path.join(dirs[i % DIRS], f"f{i:07d}") for i in range(count)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    times = {}

    t = time.perf_counter()
    for p in paths:
        os.close(os.open(p, flags, 0o644))
    times["create_s"] = time.perf_counter() - t

    t = time.perf_counter()
    for p in paths:
        os.lstat(p)
    times["stat_s"] = time.perf_counter() - t

    t = time.perf_counter()
    seen = 0
    for d in dirs:
        with os.scandir(d) as it:
            for e in it:
                e.is_file(follow_symlinks=False)
                seen += 1
    times["readdir_s"] = time.perf_counter() - t
    if seen != count:
        print(f"metadata-job.py: readdir found {seen} files, not {count}", file=sys.stderr)
        return 1

    t = time.perf_counter()
    for p in paths:
        os.unlink(p)
    times["unlink_s"] = time.perf_counter() - t

    for d in dirs:
        os.rmdir(d)
    os.rmdir(root)
    out = {k: round(v, 4) for k, v in times.items()}
    out["files"] = count
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
