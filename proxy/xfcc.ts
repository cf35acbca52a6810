// The x-forwarded-client-cert header, in Envoy's format, so that apps (and Envoy-aware
// libraries) read the caller's identity the way they would behind Envoy or Istio:
//   By=<our identity>;Hash=<sha256 of the client cert>;Subject="<RFC 2253>";URI=<uri SAN>;DNS=<dns SAN>...
// Only the sidecar sets it: inbound and outbound both drop any copy that arrives from a caller.
import type { PeerIdentity } from "./policy.js";

export const XFCC = "x-forwarded-client-cert";

/** Values with `,` `;` `=` `"` or spaces are double-quoted, inner quotes escaped (Envoy's rule). */
function quote(value: string): string {
  return /[,;="\s]/.test(value) ? `"${value.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"` : value;
}

/** The header value for one verified peer; computed once per connection, not per request. */
export function xfccValue(by: string, peer: PeerIdentity): string {
  const parts = [`By=${quote(by)}`, `Hash=${peer.sha256}`, `Subject="${peer.subject.replaceAll('"', '\\"')}"`];
  if (peer.uris[0]) parts.push(`URI=${quote(peer.uris[0])}`);
  for (const dns of peer.dns) parts.push(`DNS=${quote(dns)}`);
  return parts.join(";");
}
