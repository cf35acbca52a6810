// HTTP Upgrade (WebSocket) across the sidecar, both directions: the upgrade request is checked
// like any request by the caller (policy, destinations), then written to the upstream with the
// headers an upgrade needs (Upgrade and Connection stay; other hop-by-hop headers go), and from
// there the two sockets are piped with backpressure until either side closes. The upstream's
// answer goes back as it is (a 101 and then frames, or a refusal); its status is reported for
// the metrics. Closing the client socket (revocation, drain) closes the tunnel.
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { pipeline } from "node:stream";
import { forwardRequestHeaders } from "./forward.js";

/** The request head to send upstream for an upgrade: origin-form, Host, the upgrade headers kept. */
export function upgradeHead(req: IncomingMessage, path: string, authority: string, set: readonly string[]): string {
  const headers = forwardRequestHeaders(req.rawHeaders, req.headers.connection, set);
  const lines = [`${req.method} ${path} HTTP/1.1`, `host: ${authority}`];
  for (let i = 0; i < headers.length; i += 2) lines.push(`${headers[i]}: ${headers[i + 1]}`);
  lines.push(`connection: upgrade`, `upgrade: ${req.headers.upgrade ?? "websocket"}`);
  return `${lines.join("\r\n")}\r\n\r\n`;
}

/**
 * Writes `head` (and the bytes the client already sent after its request) to `upstream`, then
 * pipes both ways. `answered` gets the status of the upstream's first line, once.
 */
export function tunnel(
  client: Duplex,
  upstream: Duplex,
  head: string,
  early: Buffer,
  answered: (status: number) => void,
): void {
  upstream.write(head);
  if (early.length > 0) upstream.write(early);
  upstream.once("data", (first: Buffer) => {
    const match = /^HTTP\/1\.[01] (\d{3})/.exec(first.subarray(0, 16).toString("latin1"));
    answered(match ? Number(match[1]) : 502);
  });
  // pipeline destroys both on an error or a close of either, as a tunnel must.
  pipeline(client, upstream, client, () => undefined);
}
