// Reads the server name (SNI) and the ALPN protocols a client offers from its ClientHello, before
// any TLS server sees the connection. The inbound listener uses it for one decision only: a
// connection that offers ALPN "acme-tls/1" is an ACME CA validating a tls-alpn-01 challenge
// (RFC 8737) and goes to the challenge responder, never to the mTLS server or the app.
// Anything malformed or cut short reads as "no SNI, no ALPN", which keeps the normal mTLS path:
// the TLS server then refuses it with its own, better error.

/** TLS record header (5) + handshake header (4). */
const RECORD_HEADER = 5;
const MAX_RECORD = 16_384 + 2_048; // a TLSPlaintext fragment, with room for a compressed record

export interface ClientHello {
  serverName: string | null;
  alpn: string[];
}

/**
 * How many bytes the first TLS record of `data` needs in all (header included), or null when
 * `data` does not start with a handshake record or announces more than a record may hold.
 */
export function firstRecordLength(data: Buffer): number | null {
  if (data.length > 0 && data[0] !== 0x16) return null;
  if (data.length < RECORD_HEADER) return RECORD_HEADER;
  const length = data.readUInt16BE(3);
  return length > MAX_RECORD ? null : RECORD_HEADER + length;
}

/** SNI and ALPN of the ClientHello in the first record of `data`; empty when they cannot be read. */
export function parseClientHello(data: Buffer): ClientHello {
  const none: ClientHello = { serverName: null, alpn: [] };
  const total = firstRecordLength(data);
  if (total === null || data.length < total) return none;
  const hello = data.subarray(RECORD_HEADER, total);
  // Handshake: msg_type client_hello (1), uint24 length.
  if (hello[0] !== 0x01 || hello.length < 4) return none;
  let at = 4 + 2 + 32; // legacy_version, random
  const skip = (lengthBytes: 1 | 2): boolean => {
    if (at + lengthBytes > hello.length) return false;
    const n = lengthBytes === 1 ? (hello[at] ?? 0) : hello.readUInt16BE(at);
    at += lengthBytes + n;
    return at <= hello.length;
  };
  if (!skip(1) || !skip(2) || !skip(1)) return none; // session id, cipher suites, compression methods
  if (at + 2 > hello.length) return none; // no extensions at all
  const end = Math.min(hello.length, at + 2 + hello.readUInt16BE(at));
  at += 2;
  const result: ClientHello = { serverName: null, alpn: [] };
  while (at + 4 <= end) {
    const type = hello.readUInt16BE(at);
    const length = hello.readUInt16BE(at + 2);
    const body = hello.subarray(at + 4, Math.min(end, at + 4 + length));
    at += 4 + length;
    if (type === 0x0000) result.serverName = serverName(body);
    else if (type === 0x0010) result.alpn = protocols(body);
  }
  return result;
}

/** server_name extension: a list of (type, name); type 0 is host_name. */
function serverName(body: Buffer): string | null {
  let at = 2;
  while (at + 3 <= body.length) {
    const type = body[at];
    const length = body.readUInt16BE(at + 1);
    const name = body.subarray(at + 3, at + 3 + length);
    if (type === 0 && name.length === length) return name.toString("latin1").toLowerCase();
    at += 3 + length;
  }
  return null;
}

/** application_layer_protocol_negotiation extension: a list of length-prefixed names. */
function protocols(body: Buffer): string[] {
  const out: string[] = [];
  let at = 2;
  while (at < body.length) {
    const length = body[at] ?? 0;
    const name = body.subarray(at + 1, at + 1 + length);
    if (name.length !== length || length === 0) break;
    out.push(name.toString("latin1"));
    at += 1 + length;
  }
  return out;
}

/** The protocol name of tls-alpn-01 (RFC 8737 §6.2). */
export const ACME_TLS_ALPN = "acme-tls/1";
