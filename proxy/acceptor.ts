// Admission for the TLS listeners: every TCP connection is accepted here before a TLS handshake
// may cost anything. Connections that have not finished their handshake are the attack surface
// (slowloris, half-open floods, ClientHello floods): they are capped in total and per source
// address, and a new one displaces the oldest rather than being refused, so an attacker cannot
// hold the table against clients whose handshakes take milliseconds. Each gets a deadline for
// its whole handshake. The first bytes are read here: a connection that never sends any was a
// probe (a health check, a port scan) and is not a failed handshake; one whose first byte is not
// a TLS record is told so and closed. Only then is the socket handed to the TLS server. With
// `readHello`, the whole first record (the ClientHello) is read first and handed over with the
// socket, so that the listener can route by what the client offers (ACME's tls-alpn-01).
import net, { type AddressInfo, type Socket } from "node:net";
import type { Config } from "../config/schema.js";
import { firstRecordLength } from "./client-hello.js";
import type { FailureReason } from "./metrics.js";

/** TLS record type of a handshake message (RFC 8446 §5.1): every ClientHello starts with it. */
const TLS_HANDSHAKE_RECORD = 0x16;

interface Pending {
  raw: Socket;
  source: string;
  acceptedAt: number;
  timer: NodeJS.Timeout;
  /** True once the first bytes arrived (the handshake started). */
  started: boolean;
  /** Why the TLS server failed the handshake, when it said so before the connection closed. */
  failure: { reason: FailureReason; detail: string } | null;
}

export interface AcceptorHooks {
  /**
   * A connection that started with a TLS record: hand it to the TLS server. `hello` is the first
   * record as read (all of it with readHello; else the first chunk), already put back on `raw`.
   */
  handOver(raw: Socket, hello: Buffer): void;
  /**
   * A handshake that failed, once per connection: closed by admission (timeout, overload), failed
   * by TLS (the reason it gave), or ended by the client midway (aborted).
   */
  failed(reason: FailureReason, source: string, detail: string): void;
  /** A connection whose first bytes are not TLS (`http` when they look like an HTTP request), to close. */
  notTls(raw: Socket, http: boolean): void;
}

function key(socket: Pick<Socket, "remoteAddress" | "remotePort" | "localAddress" | "localPort">): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}

/** "::ffff:10.0.0.1" and "10.0.0.1" are one source. */
function sourceOf(raw: Socket): string {
  const address = raw.remoteAddress ?? "unknown";
  return address.startsWith("::ffff:") ? address.slice(7) : address;
}

export class Acceptor {
  readonly server: net.Server;
  /** Connections still in their handshake, oldest first (a Map keeps insertion order). */
  private readonly pending = new Map<string, Pending>();
  private readonly perSource = new Map<string, number>();
  private open = 0;
  private readonly rate: SourceRate;

  constructor(
    private readonly limits: Pick<
      Config["limits"],
      | "maxConnections"
      | "maxPendingHandshakes"
      | "maxPendingHandshakesPerSource"
      | "handshakeTimeoutMs"
      | "handshakesPerSecondPerSource"
    >,
    private readonly hooks: AcceptorHooks,
    private readonly options: { readHello?: boolean } = {},
  ) {
    this.rate = new SourceRate(limits.handshakesPerSecondPerSource);
    this.server = net.createServer({ pauseOnConnect: true, noDelay: true }, (raw) => this.accept(raw));
  }

  /** Connections accepted and not yet closed, handshaking or not. */
  get openConnections(): number {
    return this.open;
  }

  get pendingHandshakes(): number {
    return this.pending.size;
  }

  listen(target: { port: number; host: string } | { fd: number }): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(target, () => {
        this.server.off("error", reject);
        resolve(this.server.address() as AddressInfo);
      });
    });
  }

  private accept(raw: Socket): void {
    const source = sourceOf(raw);
    if (this.open >= this.limits.maxConnections) {
      this.hooks.failed("overload", source, `limits.maxConnections (${this.limits.maxConnections}) reached`);
      raw.destroy();
      return;
    }
    if (!this.rate.take(source)) {
      this.hooks.failed(
        "overload",
        source,
        `limits.handshakesPerSecondPerSource (${this.limits.handshakesPerSecondPerSource}) exceeded by ${source}`,
      );
      raw.destroy();
      return;
    }
    this.open++;
    const id = key(raw);
    // A connection that closes while its handshake is pending failed it, unless it was a probe
    // that never sent a byte; the reason is the TLS server's when it gave one.
    raw.once("close", () => {
      this.open--;
      const p = this.forget(id);
      if (!p?.started) return;
      this.hooks.failed(
        p.failure?.reason ?? "aborted",
        p.source,
        p.failure?.detail ?? "the client closed the connection during the handshake",
      );
    });
    raw.on("error", () => raw.destroy()); // a reset before the TLS server owns the socket
    this.makeRoom(source);
    const entry: Pending = {
      raw,
      source,
      acceptedAt: performance.now(),
      started: false,
      failure: null,
      timer: setTimeout(() => {
        this.forget(id);
        this.hooks.failed(
          "timeout",
          source,
          `no TLS handshake within limits.handshakeTimeoutMs (${this.limits.handshakeTimeoutMs} ms)${entry.started ? "" : ": the client sent nothing"}`,
        );
        raw.destroy();
      }, this.limits.handshakeTimeoutMs),
    };
    this.pending.set(id, entry);
    this.perSource.set(source, (this.perSource.get(source) ?? 0) + 1);
    let read: Buffer = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      entry.started = true;
      read = read.length === 0 ? chunk : Buffer.concat([read, chunk]);
      if (read[0] !== TLS_HANDSHAKE_RECORD) {
        raw.off("data", onData);
        this.forget(id);
        this.hooks.notTls(raw, /^[A-Z]{3,10} /.test(read.subarray(0, 12).toString("latin1")));
        return;
      }
      // A ClientHello split over TCP segments: wait for the rest of its record (the handshake
      // deadline above still applies). A record too long to be a ClientHello is not waited for.
      const needed = this.options.readHello ? firstRecordLength(read) : null;
      if (needed !== null && read.length < needed) return;
      raw.off("data", onData);
      raw.pause();
      raw.unshift(read);
      this.hooks.handOver(raw, read);
      // The TLS socket reads what was put back, then the rest from the wire.
      process.nextTick(() => raw.resume());
    };
    raw.on("data", onData);
    raw.resume();
  }

  /**
   * Keeps the handshake table within its caps before a new entry: the oldest connection of the
   * same source when that source is at its cap, else the oldest of all when the table is full.
   */
  private makeRoom(source: string): void {
    const { maxPendingHandshakes, maxPendingHandshakesPerSource } = this.limits;
    if ((this.perSource.get(source) ?? 0) >= maxPendingHandshakesPerSource) {
      for (const [id, p] of this.pending) {
        if (p.source !== source) continue;
        this.evict(
          id,
          p,
          `limits.maxPendingHandshakesPerSource (${maxPendingHandshakesPerSource}) reached for ${source}`,
        );
        break;
      }
    }
    if (this.pending.size >= maxPendingHandshakes) {
      const [id, p] = this.pending.entries().next().value as [string, Pending];
      this.evict(id, p, `limits.maxPendingHandshakes (${maxPendingHandshakes}) reached`);
    }
  }

  private evict(id: string, p: Pending, detail: string): void {
    this.forget(id);
    this.hooks.failed("overload", p.source, `${detail}: the oldest unfinished handshake was closed`);
    p.raw.destroy();
  }

  private forget(id: string): Pending | undefined {
    const p = this.pending.get(id);
    if (!p) return undefined;
    clearTimeout(p.timer);
    this.pending.delete(id);
    const n = (this.perSource.get(p.source) ?? 1) - 1;
    if (n > 0) this.perSource.set(p.source, n);
    else this.perSource.delete(p.source);
    return p;
  }

  /**
   * The TLS handshake of `socket` completed (the TLS socket stands for the raw one, matched by
   * address): the seconds since its TCP accept, or null when it was not pending.
   */
  settled(socket: Socket): number | null {
    const p = this.forget(key(socket));
    return p ? (performance.now() - p.acceptedAt) / 1000 : null;
  }

  /**
   * The TLS server failed the handshake of `socket`: the reason is counted when the connection
   * closes. A socket already closed no longer has its address; it is counted as aborted.
   */
  failedHandshake(socket: Socket, reason: FailureReason, detail: string): void {
    const p = this.pending.get(key(socket));
    if (p) p.failure = { reason, detail };
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * New connections per second from one source address, as a token bucket (a burst of twice the
 * rate). A ClientHello costs the server a key exchange and a signature and the client almost
 * nothing; in a mesh, callers are sidecars that pool and resume connections, so a source opening
 * hundreds a second is a flood. 0 turns it off (the default: behind NAT or rootless Podman's port
 * forwarding, every client may share one source address).
 */
class SourceRate {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(private readonly perSecond: number) {}

  take(source: string): boolean {
    if (this.perSecond <= 0) return true;
    const now = performance.now();
    const burst = this.perSecond * 2;
    let bucket = this.buckets.get(source);
    if (!bucket) {
      if (this.buckets.size >= 4096) this.buckets.clear(); // bounded when sources churn
      bucket = { tokens: burst, at: now };
      this.buckets.set(source, bucket);
    }
    bucket.tokens = Math.min(burst, bucket.tokens + ((now - bucket.at) / 1000) * this.perSecond);
    bucket.at = now;
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }
}
