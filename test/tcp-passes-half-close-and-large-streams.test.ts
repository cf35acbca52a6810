// A TCP pair carries a connection's bytes whole and its half-closes separately: a client that
// shuts down its sending side still gets an answer the server sends only after that (the
// server reads to EOF first), a server that shuts down its sending side still receives what the
// client sends afterwards, and 16 MB each way arrive byte for byte.
import { createHash, randomBytes } from "node:crypto";
import net from "node:net";
import t from "tap";
import { pki, sidecar } from "./lib/mesh.js";
import { countingServer } from "./lib/tcp.js";

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

t.test("half-close in both directions, and large streams", async (t) => {
  const p = await pki(t);
  // Reads to EOF, then answers with the digest and length of what it read.
  const digest = await countingServer(t, (socket) => {
    const hash = createHash("sha256");
    let length = 0;
    socket.on("data", (d: Buffer) => {
      hash.update(d);
      length += d.length;
    });
    socket.on("end", () => socket.end(`${hash.digest("hex")} ${length}`));
  });
  // Says hello and shuts down its sending side at once, then keeps reading.
  let lateRead: (got: string) => void = () => {};
  const banner = await countingServer(t, (socket) => {
    let got = "";
    socket.end("hello, I will not write again\n");
    socket.on("data", (d: Buffer) => {
      got += d.toString("latin1");
    });
    socket.on("end", () => lateRead(got));
  });
  const echo = await countingServer(t);
  const server = await sidecar(t, p, "media.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      inbound: [
        { name: "digest", listen: "127.0.0.1:0", target: digest.target, allow: ["boards.ashchan.local"] },
        { name: "banner", listen: "127.0.0.1:0", target: banner.target, allow: ["boards.ashchan.local"] },
        { name: "echo", listen: "127.0.0.1:0", target: echo.target, allow: ["boards.ashchan.local"] },
      ],
    },
  });
  const client = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      outbound: ["digest", "banner", "echo"].map((name) => ({
        name,
        listen: "127.0.0.1:0",
        target: `127.0.0.1:${server.tcpPorts[name]}`,
        identity: "media.ashchan.local",
      })),
    },
  });
  const connect = (name: string) =>
    net.connect({ port: client.tcpPorts[name] as number, host: "127.0.0.1", allowHalfOpen: true });
  const readAll = (s: net.Socket) =>
    new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      s.on("data", (d: Buffer) => chunks.push(d));
      s.on("error", reject);
      s.on("end", () => resolve(Buffer.concat(chunks)));
    });

  await t.test("the client ends its side; the answer that follows arrives", async (t) => {
    const payload = randomBytes(16 * 1024 * 1024);
    const s = connect("digest");
    const answer = readAll(s);
    s.end(payload);
    t.equal((await answer).toString(), `${sha256(payload)} ${payload.length}`, "16 MB in, digest back after EOF");
  });

  await t.test("the server ends its side; what the client sends after still arrives", async (t) => {
    const s = connect("banner");
    const hello = await readAll(s);
    t.equal(hello.toString(), "hello, I will not write again\n", "the client read the banner and the server's EOF");
    const late = new Promise<string>((resolve) => {
      lateRead = resolve;
    });
    s.end("sent after the server's EOF");
    t.equal(await late, "sent after the server's EOF", "the server read it, then the client's EOF");
  });

  await t.test("16 MB through an echo, both directions at once", async (t) => {
    const payload = randomBytes(16 * 1024 * 1024);
    const s = connect("echo");
    const back = readAll(s);
    s.end(payload);
    const got = await back;
    t.equal(got.length, payload.length);
    t.equal(sha256(got), sha256(payload), "byte for byte");
  });
});
