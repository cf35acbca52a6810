// gRPC across the mesh: a @grpc/grpc-js client calls a grpc-js server through a sidecar pair
// (HTTP/2 between the sidecars, cleartext HTTP/2 to and from the apps), the four call shapes with
// trailers, 4 MiB messages, deadlines and cancellation; refusals answer as gRPC statuses; the
// caller's identity reaches the server as x-forwarded-client-cert metadata. The client reaches its
// sidecar on a mapped port (h2c prior knowledge) and through grpc_proxy (HTTP CONNECT).
import * as grpc from "@grpc/grpc-js";
import t from "tap";
import { eventually, type Pki, pki, sample, sidecar, type Tap } from "./lib/mesh.js";

const ECHO = "/ashchan.search.v1.Index";
const identity = (b: Buffer) => b;
const method = (name: string, requestStream: boolean, responseStream: boolean) => ({
  path: `${ECHO}/${name}`,
  requestStream,
  responseStream,
  requestSerialize: identity,
  requestDeserialize: identity,
  responseSerialize: identity,
  responseDeserialize: identity,
});
const SERVICE = {
  Unary: method("Unary", false, false),
  ServerStream: method("ServerStream", false, true),
  ClientStream: method("ClientStream", true, false),
  Bidi: method("Bidi", true, true),
  Slow: method("Slow", false, false),
  Hang: method("Hang", false, true),
} as unknown as grpc.ServiceDefinition;
const Client = grpc.makeGenericClientConstructor(SERVICE, "Index");
type IndexClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

interface Seen {
  xfcc: string[];
  cancelled: number;
}

/** A gRPC server (cleartext HTTP/2, as the app behind a sidecar), answering what it saw. */
async function grpcApp(t: Tap): Promise<{ port: number; seen: Seen; server: grpc.Server }> {
  const seen: Seen = { xfcc: [], cancelled: 0 };
  const server = new grpc.Server({
    "grpc.max_receive_message_length": 8 << 20,
    "grpc.max_send_message_length": 8 << 20,
  });
  const note = (call: { metadata: grpc.Metadata }) => {
    seen.xfcc.push(String(call.metadata.get("x-forwarded-client-cert")[0] ?? ""));
  };
  const trailer = () => {
    const m = new grpc.Metadata();
    m.set("x-index-shard", "7");
    return m;
  };
  server.addService(SERVICE, {
    Unary: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      note(call);
      cb(null, Buffer.concat([Buffer.from("echo:"), call.request]), trailer());
    },
    ServerStream: (call: grpc.ServerWritableStream<Buffer, Buffer>) => {
      note(call);
      for (let i = 0; i < 5; i++) call.write(Buffer.from(`part ${i} of ${call.request.toString()}`));
      call.end(trailer());
    },
    ClientStream: (call: grpc.ServerReadableStream<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      note(call);
      let bytes = 0;
      call.on("data", (d: Buffer) => (bytes += d.length));
      call.on("end", () => cb(null, Buffer.from(String(bytes)), trailer()));
    },
    Bidi: (call: grpc.ServerDuplexStream<Buffer, Buffer>) => {
      note(call);
      call.on("data", (d: Buffer) => call.write(Buffer.concat([Buffer.from("re:"), d])));
      call.on("end", () => call.end(trailer()));
    },
    Slow: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      note(call);
      const timer = setTimeout(() => cb(null, Buffer.from("late")), 5_000);
      call.on("cancelled", () => clearTimeout(timer));
    },
    Hang: (call: grpc.ServerWritableStream<Buffer, Buffer>) => {
      note(call);
      call.write(Buffer.from("first"));
      call.on("cancelled", () => seen.cancelled++);
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  t.teardown(() => server.forceShutdown());
  return { port, seen, server };
}

async function mesh(t: Tap, options: { allow?: string[]; routes?: unknown[] } = {}) {
  const p = await pki(t);
  const backend = await grpcApp(t);
  const search = await sidecar(t, p, "search.ashchan.local", {
    inbound: {
      app: `http://127.0.0.1:${backend.port}`,
      appProtocol: "h2c",
      allow: options.allow ?? ["boards.ashchan.local"],
      ...(options.routes ? { routes: options.routes } : {}),
    },
    outbound: { enabled: false },
  });
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["search.ashchan.local"],
      resolve: { "search.ashchan.local": `127.0.0.1:${search.inboundPort}` },
      upstreams: { search: { listen: "127.0.0.1:0", target: "search.ashchan.local:8443" } },
    },
  });
  const mapped = boards.sidecar.addresses.outbound.find((l) => l.name === "upstream search")?.address.port ?? 0;
  const client = new Client(`127.0.0.1:${mapped}`, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 8 << 20,
    "grpc.max_send_message_length": 8 << 20,
  }) as unknown as IndexClient;
  t.teardown(() => client.close());
  return { p, backend, search, boards, client, mapped };
}

function unary(client: IndexClient, name: string, body: Buffer, options: grpc.CallOptions = {}) {
  return new Promise<{ err: grpc.ServiceError | null; value: Buffer | null; trailers: grpc.Metadata | null }>(
    (resolve) => {
      let trailers: grpc.Metadata | null = null;
      const call = (client[name] as (...a: unknown[]) => grpc.ClientUnaryCall)(
        body,
        new grpc.Metadata(),
        options,
        (err: grpc.ServiceError | null, value: Buffer | null) => setImmediate(() => resolve({ err, value, trailers })),
      );
      call.on("status", (s: grpc.StatusObject) => (trailers = s.metadata));
    },
  );
}

t.test("the four call shapes, trailers and 4 MiB messages cross the mesh", async (t) => {
  const { client, backend, search, boards } = await mesh(t);
  const one = await unary(client, "Unary", Buffer.from("hello"));
  t.equal(one.err, null, "unary: no error");
  t.equal(one.value?.toString(), "echo:hello");
  t.same(one.trailers?.get("x-index-shard"), ["7"], "the server's trailers came through");

  const big = Buffer.alloc(4 << 20, 7);
  const large = await unary(client, "Unary", big);
  t.equal(large.value?.length, big.length + 5, "a 4 MiB request and answer");

  const parts: string[] = [];
  await new Promise<void>((resolve, reject) => {
    const call = (client.ServerStream as (...a: unknown[]) => grpc.ClientReadableStream<Buffer>)(Buffer.from("q"));
    call.on("data", (d: Buffer) => parts.push(d.toString()));
    call.on("error", reject);
    call.on("end", () => resolve());
  });
  t.same(
    parts,
    [0, 1, 2, 3, 4].map((i) => `part ${i} of q`),
    "server streaming",
  );

  const counted = await new Promise<string>((resolve, reject) => {
    const call = (client.ClientStream as (...a: unknown[]) => grpc.ClientWritableStream<Buffer>)(
      (err: Error | null, v: Buffer) => (err ? reject(err) : resolve(v.toString())),
    );
    for (let i = 0; i < 16; i++) call.write(Buffer.alloc(256 << 10, i)); // 4 MiB in 16 messages
    call.end();
  });
  t.equal(counted, String(16 * (256 << 10)), "client streaming with backpressure");

  const replies: string[] = [];
  await new Promise<void>((resolve, reject) => {
    const call = (client.Bidi as () => grpc.ClientDuplexStream<Buffer, Buffer>)();
    call.on("data", (d: Buffer) => {
      replies.push(d.toString());
      if (replies.length < 3) call.write(Buffer.from(`m${replies.length}`));
      else call.end();
    });
    call.on("error", reject);
    call.on("end", () => resolve());
    call.write(Buffer.from("m0"));
  });
  t.same(replies, ["re:m0", "re:m1", "re:m2"], "bidirectional, each side answering the other");

  t.ok(
    backend.seen.xfcc.every((x) => /DNS=boards\.ashchan\.local/.test(x)),
    "the server read the caller in XFCC metadata",
  );
  const m = await search.metrics();
  t.equal(
    sample(m, "mtls_requests_total", { direction: "inbound", peer: "boards.ashchan.local", protocol: "grpc" }),
    5,
    "five calls counted as protocol=grpc",
  );
  t.equal(
    sample(m, "mtls_handshake_total", { direction: "inbound", result: "ok" }),
    1,
    "one connection between the sidecars carried it all",
  );
  t.equal(sample(await boards.metrics(), "mtls_open_connections", { direction: "outbound", protocol: "h2" }), 1);
  t.match(boards.logs.events("mtls_handshake_complete")[0], { direction: "outbound", alpn: "h2" });
});

t.test("deadlines and cancellation reach the server", async (t) => {
  const { client, backend } = await mesh(t);
  const slow = await unary(client, "Slow", Buffer.from("x"), { deadline: Date.now() + 300 });
  t.equal(slow.err?.code, grpc.status.DEADLINE_EXCEEDED, "a call past its deadline: DEADLINE_EXCEEDED");

  const call = (client.Hang as (...a: unknown[]) => grpc.ClientReadableStream<Buffer>)(Buffer.from("x"));
  call.on("error", () => undefined);
  await new Promise<void>((resolve) => call.once("data", () => resolve()));
  call.cancel();
  t.ok(await eventually(() => backend.seen.cancelled === 1, 10_000), "cancelling the call cancelled it at the server");
});

t.test("refusals are gRPC statuses", async (t) => {
  const refused = await mesh(t, { allow: ["gateway.ashchan.local"] });
  const denied = await unary(refused.client, "Unary", Buffer.from("x"));
  t.equal(denied.err?.code, grpc.status.PERMISSION_DENIED, "an identity not on the allow-list: PERMISSION_DENIED");
  t.match(denied.err?.details, /boards\.ashchan\.local may not call POST \/ashchan\.search\.v1\.Index\/Unary/);
  t.same(refused.backend.seen.xfcc, [], "the refused call never reached the server");

  const routed = await mesh(t, {
    allow: ["boards.ashchan.local"],
    routes: [{ path: `${ECHO}/Bidi`, allow: ["moderation.ashchan.local"] }],
  });
  t.equal((await unary(routed.client, "Unary", Buffer.from("x"))).err, null, "a method the route does not cover");
  const bidi = (routed.client.Bidi as () => grpc.ClientDuplexStream<Buffer, Buffer>)();
  const status = await new Promise<grpc.StatusObject>((resolve) => {
    bidi.on("error", () => undefined);
    bidi.on("status", resolve);
    bidi.end();
  });
  t.equal(status.code, grpc.status.PERMISSION_DENIED, "a method a route refuses: PERMISSION_DENIED");

  await new Promise<void>((resolve) => routed.backend.server.tryShutdown(() => resolve()));
  const down = await unary(routed.client, "Unary", Buffer.from("x"));
  t.equal(down.err?.code, grpc.status.UNAVAILABLE, "the server is down: UNAVAILABLE");
});

t.test("through grpc_proxy: CONNECT to the mesh name, mTLS beyond", async (t) => {
  const p: Pki = await pki(t);
  const backend = await grpcApp(t);
  const search = await sidecar(t, p, "search.ashchan.local", {
    inbound: { app: `http://127.0.0.1:${backend.port}`, appProtocol: "h2c", allow: ["boards.ashchan.local"] },
    outbound: { enabled: false },
  });
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["search.ashchan.local"],
      resolve: { "search.ashchan.local": `127.0.0.1:${search.inboundPort}` },
    },
  });
  // grpc-js reads its proxy from the environment when a channel is made (this test file's own process).
  process.env.grpc_proxy = `http://127.0.0.1:${boards.outboundPort}`;
  const client = new Client("search.ashchan.local:50051", grpc.credentials.createInsecure()) as unknown as IndexClient;
  delete process.env.grpc_proxy;
  t.teardown(() => client.close());
  const r = await unary(client, "Unary", Buffer.from("via proxy"));
  t.equal(r.err, null);
  t.equal(r.value?.toString(), "echo:via proxy");
  t.match(backend.seen.xfcc[0], /DNS=boards\.ashchan\.local/, "verified as boards at search's sidecar");
  t.equal(
    sample(await search.metrics(), "mtls_requests_total", { direction: "inbound", protocol: "grpc", code: "200" }),
    1,
  );
});
