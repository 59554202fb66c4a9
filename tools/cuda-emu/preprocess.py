#!/usr/bin/env python3
"""Copy CUDA sources for the CPU emulator, rewriting only the kernel-launch syntax.

    kernel<targs><<<grid, block, shmem, stream>>>(args...)
becomes
    ::emu::Launch(kernel<targs>, grid, block, shmem, stream)(args...)

and (the only other rewrite) a dynamic shared-memory declaration
    extern __shared__ T name[];
becomes
    T* name = ::emu::dynamic_shared<T>();

Everything else (kernel bodies included) is copied byte for byte. Comments and string
literals are skipped when looking for "<<<".

usage: preprocess.py SRC_ROOT DST_ROOT   (copies every .cu/.cuh under SRC_ROOT)
"""
import os
import re
import sys

EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w:<>\s\*]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")


def code_mask(text):
    """mask[i] is True where text[i] is code (not a comment, string or char literal)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                mask[k] = False
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c == '"' or c == "'":
            # raw strings are not used in cuda/; plain literals with escapes
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i, min(j + 1, n)):
                mask[k] = False
            i = j + 1
        else:
            i += 1
    return mask


def kernel_name_start(text, end):
    """Start index of the kernel expression that ends (exclusive) at `end`."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while True:
        if i > 0 and text[i - 1] == ">":  # template arguments: match <...> backwards
            depth = 0
            j = i - 1
            while j >= 0:
                if text[j] == ">":
                    depth += 1
                elif text[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            if j < 0:
                raise ValueError("unbalanced template arguments before <<<")
            i = j
            while i > 0 and text[i - 1].isspace():
                i -= 1
        j = i
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] == "_"):
            j -= 1
        if j == i:
            raise ValueError("no kernel name before <<<")
        i = j
        if i >= 2 and text[i - 2:i] == "::":
            i -= 2
            continue
        return i


def rewrite(text, path):
    mask = code_mask(text)
    out = []
    pos = 0
    count = 0
    search = 0
    while True:
        k = text.find("<<<", search)
        if k < 0:
            break
        if not mask[k]:
            search = k + 3
            continue
        e = text.find(">>>", k + 3)
        if e < 0:
            raise ValueError(f"{path}: <<< without >>>")
        start = kernel_name_start(text, k)
        if start < pos:
            raise ValueError(f"{path}: overlapping launches")
        name = text[start:k].strip()
        config = text[k + 3:e].strip()
        out.append(text[pos:start])
        repl = f"::emu::Launch({name}, \"{name}\", __FILE__, __LINE__, {config})"
        # keep the line count, so compiler messages and #line stay right
        repl += "\n" * (text[start:e + 3].count("\n") - repl.count("\n"))
        out.append(repl)
        pos = e + 3
        search = pos
        count += 1
    out.append(text[pos:])
    text = "".join(out)
    text, n_ext = EXTERN_SHARED.subn(r"\1* \2 = ::emu::dynamic_shared<\1>();", text)
    return text, count, n_ext


def main():
    src, dst = sys.argv[1], sys.argv[2]
    total = 0
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if not (f.endswith(".cu") or f.endswith(".cuh")):
                continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)
            with open(p, encoding="utf-8") as fh:
                text = fh.read()
            new, n, n_ext = rewrite(text, p)
            total += n
            q = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(q), exist_ok=True)
            # #line keeps compiler messages pointing at the original file
            new = f'#line 1 "{os.path.abspath(p)}"\n' + new
            old = None
            if os.path.exists(q):
                with open(q, encoding="utf-8") as fh:
                    old = fh.read()
            if old != new:  # leave unchanged files alone (no needless rebuilds)
                with open(q, "w", encoding="utf-8") as fh:
                    fh.write(new)
    print(f"preprocess.py: {total} kernel launches rewritten")


if __name__ == "__main__":
    main()
