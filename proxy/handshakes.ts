// Inbound connections between TCP accept and the end of their TLS handshake. Node's TLS server
// wraps each accepted socket in a TLSSocket of its own making and hands us only the raw socket
// ('connection') and, later, the TLSSocket ('secureConnection', 'tlsClientError'); the two are
// matched by their address pair, which is unique among open connections to one listener.
import type { Socket } from "node:net";

function key(socket: Pick<Socket, "remoteAddress" | "remotePort" | "localAddress" | "localPort">): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}

export class PendingHandshakes {
  private readonly acceptedAt = new Map<string, number>();

  get size(): number {
    return this.acceptedAt.size;
  }

  /** A TCP connection was accepted. */
  accepted(raw: Socket): void {
    const id = key(raw);
    this.acceptedAt.set(id, performance.now());
    raw.once("close", () => this.acceptedAt.delete(id));
  }

  /** The handshake of `socket` is over (done or failed): the seconds since its TCP accept, or null. */
  settled(socket: Socket): number | null {
    const id = key(socket);
    const at = this.acceptedAt.get(id);
    if (at === undefined) return null;
    this.acceptedAt.delete(id);
    return (performance.now() - at) / 1000;
  }
}
