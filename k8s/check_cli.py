#!/usr/bin/env python3
"""Checks that deployment files only pass Tandem what Tandem understands.

For every container that runs the Tandem image in rendered Kubernetes manifests, and every
`tandem <subcommand> ...` line in the compose file's `command:` strings:

- each flag (`--name`, `--name=value`, `-x`) must be listed by `tandem <subcommand> --help`;
- each environment variable named TANDEM_*, OTEL_* or HF_* (set directly, or through a ConfigMap
  the container loads with envFrom) must be one Tandem reads: listed by that subcommand's --help
  as `[env: NAME=...]`, or, for names no subcommand's --help lists, appear as a string literal in
  the Rust sources under services/ and shared/ (tests left out). A name that --help lists for other
  subcommands only is refused: that subcommand ignores it.

Anything else fails, naming the file, the container and the offender.

    check_cli.py [--bin TANDEM] [--compose compose/compose.yaml] RENDERED.yaml...
    check_cli.py --self-test       # proves that a bogus flag and a bogus variable are caught

The binary is --bin, else $TANDEM_BIN, else target/debug/tandem. Needs PyYAML.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED_ENV = re.compile(r"^(TANDEM_|OTEL_|HF_)")

# Variables a deployment file sets that Tandem does not read yet, each with why. Reported as a
# warning rather than a failure while listed; an entry Tandem has come to read fails the check
# until it is removed, so the list cannot go stale.
KNOWN_GAPS: dict = {}


class Cli:
    """What `tandem ... --help` says: subcommands, flags (and whether they take a value), env vars."""

    def __init__(self, binary):
        self.binary = binary
        self._help = {}
        self.subcommands = self._commands(())

    def help(self, path):
        if path not in self._help:
            out = subprocess.run([self.binary, *path, "--help"], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"FAIL `{self.binary} {' '.join(path)} --help` exited {out.returncode}: {out.stderr.strip()}")
            self._help[path] = parse_help(out.stdout)
        return self._help[path]

    def _commands(self, path):
        return self.help(path)["commands"]

    def all_env(self):
        """Every variable any subcommand's --help lists, with the subcommands that read it."""
        names = {}
        for sub in self.subcommands:
            for name in self.help((sub,))["env"]:
                names.setdefault(name, []).append(sub)
        return names


def parse_help(text):
    flags, shorts, env, commands = {}, {}, set(), []
    section = None
    for line in text.splitlines():
        header = re.match(r"^([A-Z][A-Za-z ]*):\s*$", line)
        if header:
            section = header.group(1)
            continue
        if section == "Commands":
            m = re.match(r"^  ([a-z][a-z0-9-]*)\s", line + " ")
            if m and m.group(1) != "help":
                commands.append(m.group(1))
        m = re.match(r"^\s{2,6}(?:-([A-Za-z0-9]),\s*)?--([a-z0-9][a-z0-9-]*)(?:[ =](<[^>]+>|\[[^\]]+\]))?", line)
        if m:
            takes_value = m.group(3) is not None
            flags[m.group(2)] = takes_value
            if m.group(1):
                shorts[m.group(1)] = takes_value
        m = re.match(r"^\s{2,6}-([A-Za-z0-9])(?:\s+<[^>]+>)?\s*$", line)
        if m:
            shorts[m.group(1)] = "<" in line
        for aliases in re.findall(r"\[(?:visible )?aliases?: ([^\]]+)\]", line):
            for a in aliases.split(","):
                flags[a.strip().lstrip("-")] = True
        env.update(re.findall(r"\[env: ([A-Z0-9_]+)=", line))
    return {"flags": flags, "shorts": shorts, "env": env, "commands": commands}


def rust_literals():
    found = set()
    for top in ("services", "shared"):
        for path in (ROOT / top).rglob("*.rs"):
            rel = path.relative_to(ROOT).parts
            if "tests" in rel or "test-support" in rel or "target" in rel:
                continue
            found.update(re.findall(r'"([A-Z][A-Z0-9_]+)"', path.read_text(errors="replace")))
    return found


class Checker:
    def __init__(self, cli, literals):
        self.cli = cli
        self.literals = literals
        self.any_env = cli.all_env()
        self.failures = []
        self.flags_checked = self.env_checked = self.commands_checked = 0
        self.gaps_seen = {}

    def fail(self, where, msg):
        self.failures.append(f"{where}: {msg}")

    def argv(self, where, argv):
        """Checks one tandem command line (the words after `tandem`); returns its subcommand path."""
        path, i = (), 0
        known = self.cli.help(path)
        while i < len(argv):
            tok = argv[i]
            i += 1
            if tok.startswith("--"):
                name, eq, _ = tok[2:].partition("=")
                self.flags_checked += 1
                if name not in known["flags"]:
                    sub = " ".join(path) or "(no subcommand)"
                    self.fail(where, f"unknown flag --{name} for `tandem {sub}` (not in its --help)")
                    if not eq and i < len(argv) and not argv[i].startswith("-"):
                        i += 1  # most likely its value: one finding, not two
                elif known["flags"][name] and not eq:
                    i += 1  # its value
            elif tok.startswith("-") and len(tok) > 1:
                self.flags_checked += 1
                if tok[1] not in known["shorts"]:
                    self.fail(where, f"unknown flag {tok} for `tandem {' '.join(path)}`")
                elif known["shorts"][tok[1]] and len(tok) == 2:
                    i += 1
            elif tok in known["commands"]:
                path = path + (tok,)
                known = self.cli.help(path)
            elif not path:
                self.fail(where, f"unknown subcommand {tok!r} (not in `tandem --help`)")
                return path
            else:
                self.fail(where, f"unexpected argument {tok!r} for `tandem {' '.join(path)}`")
        if not path:
            self.fail(where, "no tandem subcommand")
        self.commands_checked += 1
        return path

    def env(self, where, source, path, names):
        if not path:
            return
        known = self.cli.help(path)["env"]
        sub = " ".join(path)
        for name in sorted(set(names)):
            if not CHECKED_ENV.match(name):
                continue
            self.env_checked += 1
            if name in known:
                continue
            if name in self.any_env:
                self.fail(where, f"{name} is read by `tandem {'/'.join(self.any_env[name])}`, not by `tandem {sub}`")
            elif name in self.literals:
                continue
            elif (source, name) in KNOWN_GAPS:
                self.gaps_seen.setdefault((source, name), []).append(where.rsplit(" ", 1)[-1])
            else:
                self.fail(where, f"{name}: tandem does not read this variable (not in `tandem {sub} --help`, not in the Rust sources)")

    # Kubernetes ---------------------------------------------------------------------------------

    def manifests(self, source, docs):
        config = {}
        for d in docs:
            if d.get("kind") in ("ConfigMap", "Secret"):
                keys = set((d.get("data") or {}).keys()) | set((d.get("stringData") or {}).keys())
                config[(d["kind"], d["metadata"]["name"])] = keys
        for d in docs:
            for cname, c, kind_name in containers(d):
                if not is_tandem_image(c.get("image", "")):
                    continue
                where = f"{source}: {kind_name} container {cname}"
                command, args = c.get("command") or [], c.get("args") or []
                if command and pathlib.PurePath(command[0]).name in ("sh", "bash"):
                    paths = self.shell(where, " ".join(command[1:] + args))
                else:
                    if command and pathlib.PurePath(command[0]).name == "tandem":
                        command = command[1:]
                    elif command:
                        self.fail(where, f"command {command[0]!r} is neither tandem nor a shell")
                        continue
                    paths = [self.argv(where, command + args)]
                names = [e["name"] for e in c.get("env") or []]
                for ef in c.get("envFrom") or []:
                    prefix = ef.get("prefix", "")
                    for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if ref in ef:
                            keys = config.get((kind, ef[ref]["name"]))
                            if keys is None:
                                self.fail(where, f"envFrom {kind} {ef[ref]['name']} is not in the rendered manifests, its variables cannot be checked")
                            else:
                                names += [prefix + k for k in keys]
                for p in paths:
                    self.env(where, source, p, names)

    # Compose ------------------------------------------------------------------------------------

    def shell(self, where, script):
        """The tandem command lines in a shell script (`sh -c` strings)."""
        text = script
        while True:  # drop command substitutions, innermost first: they are not Tandem's flags
            stripped = re.sub(r"\$\$?\([^()]*\)", "", text)
            if stripped == text:
                break
            text = stripped
        paths = []
        for m in re.finditer(r"(?:^|[\s;&|(])(?:exec\s+)?tandem\s+([^;&|]*)", text):
            words = m.group(1).replace('"', " ").replace("'", " ").split()
            paths.append(self.argv(where, words))
        if not paths:
            self.fail(where, "no `tandem ...` command line found")
        return paths

    def compose(self, source, doc):
        for name, svc in (doc.get("services") or {}).items():
            command = svc.get("command")
            if command is None:
                continue
            script = command if isinstance(command, str) else " ".join(command)
            if not re.search(r"(?:^|[\s;&|(])(?:exec\s+)?tandem\s", script):
                continue
            where = f"{source}: service {name}"
            env = svc.get("environment") or {}
            names = list(env.keys()) if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
            for p in self.shell(where, script):
                self.env(where, source, p, names)

    def stale_gaps(self):
        for (source, name), why in KNOWN_GAPS.items():
            if (source, name) in self.gaps_seen:
                continue
            if name in self.literals or name in self.any_env:
                self.fail("k8s/check_cli.py", f"KNOWN_GAPS lists {name} for {source}, but tandem reads it now: remove the entry")


def containers(doc):
    spec = doc.get("spec") or {}
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    if kind == "Pod":
        pod = spec
    elif kind == "CronJob":
        pod = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    else:
        pod = (spec.get("template") or {}).get("spec") or {}
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        yield c.get("name"), c, f"{kind}/{name}"


def is_tandem_image(image):
    repo = image.split("@")[0]
    last = repo.rsplit("/", 1)[-1]
    return last.split(":")[0] == "tandem"


def self_test(cli, literals):
    """Runs the checks over documents with known faults; each must be caught."""
    deployment = lambda args, env: {  # noqa: E731
        "kind": "Deployment",
        "metadata": {"name": "t"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "tandem:latest", "args": args, "env": env}]}}},
    }
    cases = [
        ("a valid worker", [deployment(["prefill", "--listen=0.0.0.0:9000", "--advertise", "$(POD_IP):9000", "--kv-transport=tcp,ucx"],
                                       [{"name": "TANDEM_REDIS_URL", "value": "redis://r/"}, {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "x"}])], []),
        ("a bogus flag", [deployment(["prefill", "--listen=0.0.0.0:9000", "--bogus-flag=1"], [])], ["--bogus-flag"]),
        ("a bogus flag with its value apart", [deployment(["decode", "--kv-lisen", "0.0.0.0:7000"], [])], ["--kv-lisen"]),
        ("a bogus variable", [deployment(["gateway"], [{"name": "TANDEM_BOGUS", "value": "1"}])], ["TANDEM_BOGUS"]),
        ("another role's variable", [deployment(["kv-transfer"], [{"name": "TANDEM_MODEL", "value": "m"}])], ["TANDEM_MODEL"]),
        ("an unknown subcommand", [deployment(["prefil", "--listen=0.0.0.0:9000"], [])], ["prefil"]),
    ]
    compose_cases = [
        ("a valid compose line", 'ip="$$(hostname -i | cut -d" " -f1)"; exec tandem decode --listen 0.0.0.0:9000 --advertise "$$ip:9000"', []),
        ("a bogus compose flag", 'exec tandem gateway --listen 0.0.0.0:8000 --bogus-flag', ["--bogus-flag"]),
    ]
    ok = True
    for label, docs, expect in cases:
        c = Checker(cli, literals)
        c.manifests("self-test", docs)
        ok &= report_case(label, c.failures, expect)
    for label, script, expect in compose_cases:
        c = Checker(cli, literals)
        c.compose("self-test", {"services": {"s": {"command": [script]}}})
        ok &= report_case(label, c.failures, expect)
    print("self-test passed" if ok else "self-test FAILED")
    return 0 if ok else 1


def report_case(label, failures, expect):
    if not expect:
        good = not failures
    else:
        good = len(failures) == len(expect) and all(any(e in f for f in failures) for e in expect)
    print(f"  {'ok ' if good else 'BAD'} {label}: {'; '.join(failures) or 'no finding'}")
    return good


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("TANDEM_BIN") or str(ROOT / "target/debug/tandem"))
    ap.add_argument("--compose", action="append", default=[])
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("rendered", nargs="*")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"FAIL no tandem binary at {args.bin} (build it, or set TANDEM_BIN)")
    cli, literals = Cli(args.bin), rust_literals()
    if args.self_test:
        return self_test(cli, literals)

    checker = Checker(cli, literals)
    for path in args.rendered:
        docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        checker.manifests(path, docs)
    for path in args.compose:
        rel = os.path.relpath(pathlib.Path(path).resolve(), ROOT)
        checker.compose(rel, yaml.safe_load(pathlib.Path(path).read_text()))
    checker.stale_gaps()
    for (source, name), users in checker.gaps_seen.items():
        print(f"WARN {source} sets {name} ({', '.join(users)}), which tandem does not read: {KNOWN_GAPS[(source, name)]}")
    for f in checker.failures:
        print(f"FAIL {f}")
    if checker.failures:
        return 1
    print(f"{checker.commands_checked} tandem command lines, {checker.flags_checked} flags and {checker.env_checked} "
          f"TANDEM_/OTEL_/HF_ variables checked against `tandem --help` and the sources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
