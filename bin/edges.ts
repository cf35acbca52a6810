// `ashmesh edges URL...` (like `linkerd viz edges`): the edges the sidecars have seen, from their
// admin /edges, one row per (caller identity, callee identity), both ends' views merged.

import { loadMesh } from "../config/mesh.js";
import type { Edge } from "../proxy/edges.js";
import { parse, UsageError } from "./args.js";
import { defaultMeshFile } from "./local-mesh.js";

const HELP = `ashmesh edges URL...            admin URLs of sidecars, e.g. http://127.0.10.1:9901
ashmesh edges --mesh FILE        every sidecar of a mesh file run by \`ashmesh up\`
  [--json]                       the merged rows as JSON

SECURED is √ when both ends presented verified certificates over TLS 1.2+.`;

export interface EdgeRow {
  src: string;
  dst: string;
  src_id: string;
  dst_id: string;
  secured: boolean;
  tls: string;
  requests: number;
}

export function mergeEdges(edges: Edge[]): EdgeRow[] {
  const rows = new Map<string, EdgeRow>();
  for (const e of edges) {
    const key = `${e.src_identity}\u0000${e.dst_identity}`;
    const row = rows.get(key) ?? {
      src: e.src_identity,
      dst: e.dst_identity,
      src_id: e.src_identity,
      dst_id: e.dst_identity,
      secured: false,
      tls: e.tls_version,
      requests: 0,
    };
    // The caller's sidecar knows the caller's name; the callee's sidecar knows the callee's.
    if (e.direction === "outbound") row.src = e.src;
    if (e.direction === "inbound") row.dst = e.dst;
    row.requests = Math.max(row.requests, e.requests);
    row.secured = /^TLSv1\.[23]$/.test(e.tls_version) && e.src_identity !== "unauthenticated" && !!e.dst_identity;
    row.tls = e.tls_version;
    rows.set(key, row);
  }
  return [...rows.values()].sort((a, b) => a.src.localeCompare(b.src) || a.dst.localeCompare(b.dst));
}

function table(rows: EdgeRow[]): string {
  const head = ["SRC", "DST", "SRC_ID", "DST_ID", "SECURED", "TLS", "REQUESTS"];
  const cells = rows.map((r) => [r.src, r.dst, r.src_id, r.dst_id, r.secured ? "√" : "×", r.tls, String(r.requests)]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? "").length)));
  return [head, ...cells]
    .map((c) =>
      c
        .map((v, i) => v.padEnd(widths[i] ?? 0))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse({
    args: argv,
    allowPositionals: true,
    options: {
      mesh: { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  const urls = [...positionals];
  if (values.mesh !== undefined || urls.length === 0) {
    const mesh = loadMesh(values.mesh || defaultMeshFile());
    for (const s of [...mesh.services, ...mesh.tcp]) urls.push(`http://${s.local}:${mesh.ports.admin}`);
  }
  const edges: Edge[] = [];
  let unreachable = 0;
  for (const url of urls) {
    if (!/^https?:\/\//.test(url)) throw new UsageError(`${url}: expected an admin URL such as http://127.0.10.1:9901`);
    try {
      const res = await fetch(`${url.replace(/\/+$/, "")}/edges`, { signal: AbortSignal.timeout(3_000) });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      edges.push(...((await res.json()) as Edge[]));
    } catch (err) {
      unreachable++;
      process.stderr.write(`ashmesh edges: ${url}/edges: ${(err as Error).message}\n`);
    }
  }
  const rows = mergeEdges(edges);
  process.stdout.write(values.json ? `${JSON.stringify(rows, null, 2)}\n` : `${table(rows)}\n`);
  return unreachable > 0 || rows.some((r) => !r.secured) ? 1 : 0;
}
