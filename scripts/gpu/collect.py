#!/usr/bin/env python3
"""Gathers the JSON results of one GPU session's runs and prints their table.

Every DIR/*.json (one run each, named by its tag) is merged into $OUT/NAME, keyed by tag. Then,
for `tandem bench engine` results, one line per (phase, shape, batch, tokens) with each run's
(tokens/s, MBU or MFU %) — rows of other engines (scripts/gpu/baseline.py) under their engine's
name — and each profiled row's per-stage milliseconds; for `--projections` results, one line
per (shape, stage, tokens) with each run's microseconds and GB/s (bf16 rows under "bf16").
"""
import argparse
import glob
import json
import os


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('dir', help='folder of one JSON result per run, named TAG.json')
    p.add_argument('name', help='file name for the merged results under $OUT')
    p.add_argument('--phase', help='only rows of this phase (decode or prefill)')
    p.add_argument('--stages', help='comma-separated stages of the profiles to print (default all)')
    a = p.parse_args()
    stages = a.stages.split(',') if a.stages else None
    merged, table = {}, {}
    for f in sorted(glob.glob(os.path.join(a.dir, '*.json'))):
        tag = os.path.basename(f)[:-5]
        r = json.load(open(f))
        merged[tag] = r
        if not isinstance(r, dict):
            continue  # gpu-check results: a list of checks
        for d in r.get('rows', []):
            if a.phase and d.get('phase') != a.phase:
                continue
            k = (d.get('phase'), d.get('shape'), d.get('batch'), d.get('context') or d.get('prompt_len'))
            u = d.get('mbu') if d.get('phase') == 'decode' else d.get('mfu')
            name = tag if d.get('engine', 'tandem') == 'tandem' else d['engine']
            table.setdefault(k, {})[name] = d.get('error') or (round(d.get('tokens_per_s') or 0), round(100 * (u or 0), 1))
            bd = d.get('breakdown_ms') or []
            if bd:
                print(tag, k, {s: round(ms, 3) for s, ms in bd if stages is None or s in stages})
        for d in r.get('projections', []):
            k = (d['shape'], d['stage'], d['tokens'])
            name = 'bf16' if d['dtype'] == 'bf16' else tag
            table.setdefault(k, {})[name] = '%.1fus %dGB/s' % (d['us'], d['weight_gbps'])
    json.dump(merged, open(os.path.join(os.environ['OUT'], a.name), 'w'), indent=1)
    for k, v in sorted(table.items(), key=str):
        print(k, v)


if __name__ == '__main__':
    main()
