// The stand-in's gRPC, written with node:http2 alone (the image has no gRPC library), against a
// real gRPC implementation (@grpc/grpc-js) both ways: grpc-js calls search's stand-in, and
// boards' stand-in calls a grpc-js server on the port its sidecar would map. Then through a
// sidecar pair as the reference mesh wires it: search's one h2c server takes an HTTP/1.1 caller
// too (its inbound speaks HTTP/2 to the app), and a refusal by search's sidecar reaches boards'
// report as PERMISSION_DENIED. And the mesh file refuses a gRPC call it cannot wire.
import http2 from "node:http2";
import * as grpc from "@grpc/grpc-js";
import t from "tap";
import { type HopReport, startStandinApp, xfccDns } from "../compose/standin.js";
import { grpcUpstreams, localSidecarInput, parseMesh } from "../config/mesh.js";
import { freePort, pki, sidecar, type Tap, viaProxy } from "./lib/mesh.js";

const INDEX_POST = "/ashchan.search.v1.Indexer/IndexPost";
const identity = (b: Buffer) => b;
const SERVICE = {
  IndexPost: {
    path: INDEX_POST,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
  Drop: {
    path: "/ashchan.search.v1.Indexer/Drop",
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
} as unknown as grpc.ServiceDefinition;
const Indexer = grpc.makeGenericClientConstructor(SERVICE, "Indexer");
type Unary = (
  body: Buffer,
  metadata: grpc.Metadata,
  callback: (err: grpc.ServiceError | null, value?: Buffer) => void,
) => void;

/** boards calls search's IndexPost over gRPC, as compose/mesh.yaml has it, on ports of this test. */
async function testMesh() {
  const [boardsPort, searchPort, upstreamPort] = [await freePort(), await freePort(), await freePort()];
  return parseMesh({
    domain: "ashchan.local",
    entry: { service: "boards", path: "/api/v1/posts" },
    services: {
      boards: {
        serviceName: "boards-threads-posts",
        appPort: boardsPort,
        local: "127.0.0.1",
        calls: [{ to: "search", protocol: "grpc", path: INDEX_POST }],
      },
      search: {
        serviceName: "search-indexing",
        appPort: searchPort,
        appProtocol: "h2c",
        upstreamPort,
        local: "127.0.0.2",
      },
    },
  });
}

function unary(client: grpc.Client, name: string, body: Buffer, metadata = new grpc.Metadata()) {
  return new Promise<{ err: grpc.ServiceError | null; value: Buffer | undefined }>((resolve) =>
    ((client as unknown as Record<string, Unary>)[name] as Unary).call(client, body, metadata, (err, value) =>
      resolve({ err, value }),
    ),
  );
}

/** An HTTP request to a stand-in app, as the caller's sidecar (or `ashmesh up`) sends it. */
async function post(port: number): Promise<{ status: number; report: HopReport }> {
  const res = await fetch(`http://127.0.0.1:${port}/api/v1/posts`, { method: "POST", body: "{}" });
  return { status: res.status, report: (await res.json()) as HopReport };
}

async function startApp(t: Tap, mesh: Awaited<ReturnType<typeof testMesh>>, key: string, proxy: string) {
  const s = mesh.services.find((x) => x.key === key);
  if (!s) throw new Error(`no ${key}`);
  const app = await startStandinApp({ mesh, key, proxy, host: "127.0.0.1", port: s.appPort });
  t.teardown(() => app.close());
  return app;
}

t.test("a grpc-js client calls search's stand-in: the report comes back as the message", async (t) => {
  const mesh = await testMesh();
  const search = await startApp(t, mesh, "search", "http://127.0.0.1:1");
  const client = new Indexer(`127.0.0.1:${search.address.port}`, grpc.credentials.createInsecure());
  t.teardown(() => client.close());

  const metadata = new grpc.Metadata();
  // What search's sidecar would set: the stand-in reads the caller from it, as from an HTTP header.
  metadata.set("x-forwarded-client-cert", "By=search.ashchan.local;Hash=00;DNS=boards.ashchan.local");
  const ok = await unary(client, "IndexPost", Buffer.from('{"from":"boards"}'), metadata);
  t.equal(ok.err, null, "status OK");
  const report = JSON.parse(ok.value?.toString("utf8") ?? "null") as HopReport;
  t.match(report, { served_by: "search.ashchan.local", caller: "boards.ashchan.local", calls: [] });

  const other = await unary(client, "Drop", Buffer.from("{}"));
  t.equal(other.err?.code, grpc.status.UNIMPLEMENTED, "a method no call of the mesh file names");
  t.match(other.err?.details, /search\.ashchan\.local has no method POST \/ashchan\.search\.v1\.Indexer\/Drop/);

  // Its HTTP routes, on the same cleartext HTTP/2 server.
  const session = http2.connect(`http://127.0.0.1:${search.address.port}`);
  t.teardown(() => session.close());
  const health = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const stream = session.request({ ":path": "/health" });
    let status = 0;
    let body = "";
    stream.on("response", (h) => (status = Number(h[":status"])));
    stream.on("data", (d: Buffer) => (body += d.toString("utf8")));
    stream.on("end", () => resolve({ status, body }));
    stream.on("error", reject);
  });
  t.equal(health.status, 200);
  t.match(JSON.parse(health.body), { status: "ok", service: "search-indexing" });
});

t.test("boards' stand-in calls a grpc-js server on the port its sidecar maps to search", async (t) => {
  const mesh = await testMesh();
  const search = mesh.services.find((s) => s.key === "search");
  let answer: { code: grpc.status; details: string } | null = null;
  const seen: string[] = [];
  const server = new grpc.Server();
  server.addService(SERVICE, {
    IndexPost: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      seen.push(call.request.toString("utf8"));
      if (answer) {
        cb(answer);
        return;
      }
      const xfcc = String(call.metadata.get("x-forwarded-client-cert")[0] ?? "");
      const report: HopReport = {
        service: "search-indexing",
        served_by: "search.ashchan.local",
        caller: xfccDns(xfcc)[0] ?? null,
        xfcc: xfcc || null,
        calls: [],
      };
      cb(null, Buffer.from(JSON.stringify(report)));
    },
    Drop: (_call: unknown, cb: grpc.sendUnaryData<Buffer>) => cb(null, Buffer.alloc(0)),
  });
  await new Promise<number>((resolve, reject) =>
    server.bindAsync(`127.0.0.1:${search?.upstreamPort}`, grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  t.teardown(() => server.forceShutdown());
  // The mapped port is on the host of the proxy: the sidecar's listeners share its app's loopback.
  const boards = await startApp(t, mesh, "boards", "http://127.0.0.1:1");

  const ok = await post(boards.address.port);
  t.equal(ok.status, 200);
  t.match(ok.report.calls, [
    { to: "search.ashchan.local", protocol: "grpc", method: "POST", path: INDEX_POST, status: 200, grpc_status: 0 },
  ]);
  t.match(ok.report.calls[0]?.answer, { served_by: "search.ashchan.local" }, "the answer is search's message");
  t.same(seen, ['{"from":"boards"}'], "one message, JSON bytes");

  answer = { code: grpc.status.PERMISSION_DENIED, details: "boards.ashchan.local may not call it" };
  const denied = await post(boards.address.port);
  t.equal(denied.status, 502, "a failed call fails boards' answer");
  t.match(denied.report.calls[0], {
    grpc_status: 7,
    error: /^7 PERMISSION_DENIED: boards\.ashchan\.local may not call it \(via 127\.0\.0\.1:\d+\)/,
  });

  await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
  const down = await post(boards.address.port);
  t.equal(down.status, 502);
  t.match(down.report.calls[0], { status: 0, grpc_status: null, error: /ECONNREFUSED/ }, "nobody on the port");
});

t.test("through a sidecar pair: gRPC and HTTP/1.1 reach search's one h2c server", async (t) => {
  const p = await pki(t);
  const mesh = await testMesh();
  const search = mesh.services.find((s) => s.key === "search");
  const searchApp = await startApp(t, mesh, "search", "http://127.0.0.1:1");
  const searchInput = localSidecarInput(mesh, "search", p.dir);
  t.equal(searchInput.inbound?.appProtocol, "h2c", "the mesh file makes search's inbound speak h2c to its app");
  const searchSidecar = await sidecar(t, p, "search.ashchan.local", {
    inbound: { app: `http://127.0.0.1:${searchApp.address.port}`, appProtocol: "h2c", allow: ["boards.ashchan.local"] },
    outbound: { enabled: false },
  });
  const upstreams = grpcUpstreams(mesh, "boards", "127.0.0.1");
  t.same(upstreams, { search: { listen: `127.0.0.1:${search?.upstreamPort}`, target: "search.ashchan.local:8443" } });
  const boardsSidecar = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["search.ashchan.local"],
      resolve: { "search.ashchan.local": `127.0.0.1:${searchSidecar.inboundPort}` },
      upstreams,
    },
  });
  const boards = await startApp(t, mesh, "boards", `http://127.0.0.1:${boardsSidecar.outboundPort}`);

  const ok = await post(boards.address.port);
  t.equal(ok.status, 200, ok.report.calls[0]?.error ?? "boards' post succeeds");
  t.match(ok.report.calls[0], { grpc_status: 0, answer: { caller: "boards.ashchan.local" } });
  t.match(
    ok.report.calls[0]?.answer?.xfcc,
    /^By=search\.ashchan\.local;Hash=[0-9a-f]{64};.*DNS=boards\.ashchan\.local/,
  );

  // An HTTP/1.1 caller: the forward proxy, then HTTP/2 between the sidecars and to the app.
  const plain = await viaProxy(boardsSidecar.outboundPort, "http://search.ashchan.local/api/v1/search?q=mesh");
  t.equal(plain.status, 200);
  t.match(JSON.parse(plain.body), { served_by: "search.ashchan.local", caller: "boards.ashchan.local" });
});

t.test("a caller search's sidecar does not allow gets PERMISSION_DENIED, in boards' report", async (t) => {
  const p = await pki(t);
  const mesh = await testMesh();
  const searchApp = await startApp(t, mesh, "search", "http://127.0.0.1:1");
  const searchSidecar = await sidecar(t, p, "search.ashchan.local", {
    inbound: {
      app: `http://127.0.0.1:${searchApp.address.port}`,
      appProtocol: "h2c",
      allow: ["gateway.ashchan.local"],
    },
    outbound: { enabled: false },
  });
  const boardsSidecar = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["search.ashchan.local"],
      resolve: { "search.ashchan.local": `127.0.0.1:${searchSidecar.inboundPort}` },
      upstreams: grpcUpstreams(mesh, "boards", "127.0.0.1"),
    },
  });
  const boards = await startApp(t, mesh, "boards", `http://127.0.0.1:${boardsSidecar.outboundPort}`);
  const denied = await post(boards.address.port);
  t.equal(denied.status, 502);
  t.match(denied.report.calls[0], {
    status: 200,
    grpc_status: 7,
    error: /^7 PERMISSION_DENIED: boards\.ashchan\.local may not call POST \/ashchan\.search\.v1\.Indexer\/IndexPost/,
  });
  t.notOk(denied.report.calls[0]?.answer, "search's app never answered");
});

t.test("the mesh file refuses a gRPC call it cannot wire, naming the key", async (t) => {
  const base = {
    domain: "ashchan.local",
    entry: { service: "boards", path: "/" },
    services: {
      boards: {
        serviceName: "boards",
        appPort: 9503,
        local: "127.0.10.3",
        calls: [{ to: "search", protocol: "grpc", method: "GET", path: "/api/v1/index" }],
      },
      search: { serviceName: "search", appPort: 9505, local: "127.0.10.5" },
    },
  };
  t.throws(() => parseMesh(base, "mesh.yaml"), {
    message: new RegExp(
      [
        "services\\.boards\\.calls\\.0\\.method: a gRPC call is a POST, not GET",
        'services\\.boards\\.calls\\.0\\.path: "/api/v1/index" is not a gRPC method \\(expected /package\\.Service/Method\\)',
        "services\\.boards\\.calls\\.0: a gRPC call to search needs services\\.search\\.appProtocol: h2c",
        "services\\.boards\\.calls\\.0: a gRPC call to search needs services\\.search\\.upstreamPort",
      ].join("\\n  "),
    ),
  });
  const clash = structuredClone(base);
  clash.services.boards.calls = [{ to: "search", protocol: "grpc", method: "POST", path: INDEX_POST }];
  Object.assign(clash.services.search, { appProtocol: "h2c", upstreamPort: 15001 });
  t.throws(() => parseMesh(clash, "mesh.yaml"), {
    message: /services\.search\.upstreamPort: 15001 is already ports\.outbound/,
  });
});
