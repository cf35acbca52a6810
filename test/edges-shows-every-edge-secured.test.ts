// `ashmesh edges` (like `linkerd viz edges`): after the post flow and one connection from boards
// to Redis through its tcp.outbound, every edge of the mesh is listed once, with both identities
// and SECURED √ (the TCP edge names the listener at each end); an edge seen without a client
// identity is ×.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { parse, stringify } from "yaml";
import { mergeEdges } from "../bin/edges.js";
import { ensurePki, startLocalMesh } from "../bin/local-mesh.js";
import { loadMesh } from "../config/mesh.js";
import { ashmeshCli } from "./lib/run.js";

t.test("every edge of the post flow, secured", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-edges-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const doc = parse(readFileSync("compose/mesh.yaml", "utf8")) as {
    services: Record<string, { local: string }>;
    tcp: Record<string, { local: string }>;
  };
  for (const s of [...Object.values(doc.services), ...Object.values(doc.tcp)])
    s.local = s.local.replace("127.0.10.", "127.0.22.");
  const meshFile = join(dir, "mesh.yaml");
  writeFileSync(meshFile, stringify(doc));
  const mesh = loadMesh(meshFile);
  mkdirSync(join(dir, "logs"));
  await ensurePki(mesh, join(dir, "pki"), () => undefined);
  const running = await startLocalMesh(mesh, join(dir, "pki"), { logDir: join(dir, "logs") });
  t.teardown(() => running.stop());
  const entry = await fetch(`http://127.0.22.1:9501${mesh.entry.path}`, { method: "POST", body: "{}" });
  t.equal(entry.status, 200);
  // boards' app reaches Redis: the edge exists once both sidecars verified each other, whether
  // or not redis-server is installed to answer (without it, the tunnel closes at once).
  await new Promise<void>((resolve) => {
    const s = net.connect(6379, "127.0.22.3", () => s.write("*1\r\n$4\r\nPING\r\n"));
    s.on("data", () => s.destroy());
    s.on("error", () => undefined);
    s.on("close", () => resolve());
  });

  const table = await ashmeshCli(["edges", "--mesh", meshFile]);
  t.equal(table.code, 0);
  const lines = table.out.trim().split("\n");
  t.match(lines[0], /^SRC\s+DST\s+SRC_ID\s+DST_ID\s+SECURED\s+TLS\s+REQUESTS$/);
  t.equal(lines.length, 7, "six edges");
  t.match(table.out, /api-gateway\s+auth-accounts\s+gateway\.ashchan\.local\s+auth\.ashchan\.local\s+√\s+TLSv1\.3\s+1/);
  t.match(table.out, /boards-threads-posts\s+search-indexing\s+boards\.ashchan\.local\s+search\.ashchan\.local\s+√/);
  t.match(
    table.out,
    /boards-threads-posts\/redis\s+redis-cache\/redis\s+boards\.ashchan\.local\s+redis\.ashchan\.local\s+√\s+TLSv1\.3\s+1/,
    "the TCP edge: one tunnel",
  );
  const json = JSON.parse((await ashmeshCli(["edges", "--json", "--mesh", meshFile])).out);
  t.equal(json.length, 6);
  t.ok(json.every((r: { secured: boolean }) => r.secured));
});

t.test("merging: one row per caller/callee pair; unauthenticated is not secured", async (t) => {
  const base = {
    src: "",
    dst: "",
    tls_version: "TLSv1.3",
    cipher_suite: "TLS_AES_256_GCM_SHA384",
    requests: 3,
    last_seen: "",
  };
  const rows = mergeEdges([
    {
      ...base,
      direction: "outbound",
      src: "api-gateway",
      dst: "auth.ashchan.local:8443",
      src_identity: "gateway.ashchan.local",
      dst_identity: "auth.ashchan.local",
    },
    {
      ...base,
      direction: "inbound",
      src: "10.0.0.1",
      dst: "auth-accounts",
      src_identity: "gateway.ashchan.local",
      dst_identity: "auth.ashchan.local",
    },
    {
      ...base,
      direction: "inbound",
      src: "10.0.0.9",
      dst: "auth-accounts",
      src_identity: "unauthenticated",
      dst_identity: "auth.ashchan.local",
    },
  ]);
  t.equal(rows.length, 2);
  t.match(
    rows.find((r) => r.src_id === "gateway.ashchan.local"),
    { src: "api-gateway", dst: "auth-accounts", secured: true },
  );
  t.match(
    rows.find((r) => r.src_id === "unauthenticated"),
    { secured: false },
  );
});
