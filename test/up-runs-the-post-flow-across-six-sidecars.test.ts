// `ashmesh up --once` (what `npm start` runs, without --once): the seed's post flow crosses the
// six services, and every hop shows the identity each end verified; boards has search index the
// post over gRPC, through the port its sidecar maps to search.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ashmeshCli } from "./lib/run.js";
import { redisServer } from "./lib/tcp.js";

/** `ashmesh up --once` with its PKI in DIR, given a minute: it starts six sidecars and their apps. */
const up = (dir: string) => ashmeshCli(["up", "--once", "--dir", join(dir, "pki")], { timeoutMs: 60_000 });

t.test("the post crosses gateway, auth, boards, media, moderation and search", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-up-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const first = await up(dir);
  t.equal(first.code, 0, first.err);
  t.match(first.out, /created CA CN=ashchan-ca/);
  t.match(first.out, /issued auth\.ashchan\.local/);
  const hops = [
    ["gateway", "auth", "POST /api/v1/verify"],
    ["gateway", "boards", "POST /api/v1/posts"],
    ["boards", "media", "GET /api/v1/media/abc123"],
    ["boards", "moderation", "POST /api/v1/score"],
  ];
  for (const [from, to, call] of hops) {
    const line = new RegExp(`✔ ${from}\\.ashchan\\.local → ${to}\\.ashchan\\.local  ${call}  200\n`);
    t.match(first.out, line, `${from} → ${to}`);
    t.match(first.out, new RegExp(`client cert seen by ${to}\\.ashchan\\.local: ${from}\\.ashchan\\.local`));
    t.match(
      first.out,
      new RegExp(`server cert verified by ${from}\\.ashchan\\.local's sidecar: ${to}\\.ashchan\\.local`),
    );
  }
  t.match(
    first.out,
    /✔ boards\.ashchan\.local → search\.ashchan\.local {2}gRPC \/ashchan\.search\.v1\.Indexer\/IndexPost through 127\.0\.10\.3:15005 {2}grpc-status 0 OK\n/,
    "boards → search over gRPC",
  );
  t.match(
    first.out,
    /client cert seen by search\.ashchan\.local: boards\.ashchan\.local \(app read x-forwarded-client-cert metadata: boards\.ashchan\.local\)/,
    "search's app read the caller in the call's metadata",
  );
  t.match(first.out, /server cert verified by boards\.ashchan\.local's sidecar: search\.ashchan\.local/);
  t.match(first.out, /TLSv1\.3, TLS_AES_256_GCM_SHA384/);
  if (redisServer.path) {
    t.match(
      first.out,
      /redis: redis-server on 127\.0\.10\.7:6379, behind its sidecar's tcp\.inbound 127\.0\.10\.7:6380/,
    );
    t.match(
      first.out,
      /✔ boards\.ashchan\.local → redis\.ashchan\.local {2}TCP redis PING through 127\.0\.10\.3:6379 {2}\+PONG/,
    );
    t.match(first.out, /client cert seen by redis\.ashchan\.local's sidecar: boards\.ashchan\.local/);
    t.match(first.out, /server cert verified by boards\.ashchan\.local's sidecar: redis\.ashchan\.local/);
  } else {
    t.match(
      first.out,
      /boards\.ashchan\.local → redis\.ashchan\.local {2}TCP redis: skipped: redis-server is not installed/,
    );
  }
  t.match(first.out, /issued redis\.ashchan\.local/, "the TCP server's sidecar has its certificate");
  t.match(first.out, /✔ the post crossed the mesh/);
  t.match(first.out, /http:\/\/127\.0\.10\.1:9901\/metrics/);

  const second = await up(dir);
  t.equal(second.code, 0, "a second start reuses the CA and certificates");
  t.notMatch(second.out, /created CA|issued/);
});
