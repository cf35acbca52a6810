// authorize() is a pure function: every rule is checked with identities built in memory.
import t from "tap";
import { authorize, compilePolicy, isCanonicalPath, type PeerIdentity } from "../proxy/policy.js";
import { parseSubjectAltName } from "../proxy/x509.js";
import { xfccValue } from "../proxy/xfcc.js";

function peer(primary: string, extra: Partial<PeerIdentity> = {}): PeerIdentity {
  return {
    names: [primary, ...(extra.uris ?? [])],
    primary,
    commonName: primary,
    dns: [primary],
    uris: [],
    subject: `CN=${primary}`,
    serial: "01",
    sha256: "ab".repeat(32),
    ...extra,
  };
}

const gateway = peer("gateway.ashchan.local");
const boards = peer("boards.ashchan.local");

t.test("an exact entry allows that identity and no other", async (t) => {
  const policy = compilePolicy({ allow: ["gateway.ashchan.local"] });
  t.same(authorize(policy, gateway, "POST", "/api/v1/verify"), { allowed: true, route: "default" });
  t.same(authorize(policy, boards, "POST", "/api/v1/verify"), {
    allowed: false,
    route: "default",
    reason: "not_allowed",
  });
});

t.test("an absent allow-list admits any verified identity; an empty one admits nobody", async (t) => {
  t.equal(authorize(compilePolicy({}), boards, "GET", "/").allowed, true);
  t.equal(authorize(compilePolicy({ allow: [] }), gateway, "GET", "/").allowed, false);
  t.equal(authorize(compilePolicy({ allow: ["*"] }), gateway, "GET", "/").allowed, true);
});

t.test("*.domain matches exactly one label", async (t) => {
  const policy = compilePolicy({ allow: ["*.ashchan.local"] });
  t.equal(authorize(policy, gateway, "GET", "/").allowed, true);
  t.equal(authorize(policy, peer("a.b.ashchan.local"), "GET", "/").allowed, false, "two labels");
  t.equal(authorize(policy, peer("ashchan.local"), "GET", "/").allowed, false, "zero labels");
  t.equal(authorize(policy, peer("evilashchan.local"), "GET", "/").allowed, false, "not on a label boundary");
});

t.test("entries are ORed over every name of the certificate (DNS, URI, CN)", async (t) => {
  const spiffe = peer("media.ashchan.local", { uris: ["spiffe://ashchan.local/media"] });
  const policy = compilePolicy({ allow: ["spiffe://ashchan.local/media"] });
  t.equal(authorize(policy, spiffe, "GET", "/").allowed, true);
  t.equal(authorize(policy, gateway, "GET", "/").allowed, false);
});

t.test("routes: first match wins, methods narrow, prefixes match on segment boundaries", async (t) => {
  const policy = compilePolicy({
    allow: ["*.ashchan.local"],
    routes: [
      { path: "/api/v1/verify", methods: ["POST"], allow: ["gateway.ashchan.local"] },
      { path: "/admin", allow: [] },
    ],
  });
  t.same(authorize(policy, gateway, "POST", "/api/v1/verify"), { allowed: true, route: "/api/v1/verify" });
  t.same(authorize(policy, boards, "POST", "/api/v1/verify"), {
    allowed: false,
    route: "/api/v1/verify",
    reason: "not_allowed",
  });
  t.equal(authorize(policy, boards, "POST", "/api/v1/verify/deep").allowed, false, "below the prefix");
  t.same(authorize(policy, boards, "GET", "/api/v1/verify"), { allowed: true, route: "default" }, "other method");
  t.same(authorize(policy, boards, "POST", "/api/v1/verifyx"), { allowed: true, route: "default" }, "not a segment");
  t.equal(authorize(policy, gateway, "GET", "/admin/users").allowed, false);
});

t.test("with routes in force, a path two parsers could read differently is refused", async (t) => {
  const policy = compilePolicy({ allow: ["*.ashchan.local"], routes: [{ path: "/api/v1/verify", allow: ["x.y"] }] });
  for (const path of [
    "/api//v1/verify",
    "/api/v1/./verify",
    "/api/x/../v1/verify",
    "/api/v1/%76erify",
    "/api%2fv1/verify",
    "/api\\v1",
  ]) {
    t.same(
      authorize(policy, boards, "POST", path),
      { allowed: false, route: "default", reason: "non_canonical_path" },
      path,
    );
  }
  t.equal(isCanonicalPath("/api/v1/posts%20x"), true, "an encoded space is not ambiguous");
  t.equal(authorize(compilePolicy({}), boards, "GET", "/a//b").allowed, true, "without routes the path is not judged");
});

t.test("a client without certificate passes only where any caller is allowed", async (t) => {
  t.equal(authorize(compilePolicy({}), null, "GET", "/").allowed, true);
  t.same(authorize(compilePolicy({ allow: ["*"] }), null, "GET", "/"), {
    allowed: false,
    route: "default",
    reason: "unauthenticated",
  });
});

t.test("subjectAltName text from Node, quoted values included", async (t) => {
  t.same(parseSubjectAltName('DNS:a.ashchan.local, URI:spiffe://x/y, IP Address:10.0.0.1, DNS:"b,c"'), [
    { type: "DNS", value: "a.ashchan.local" },
    { type: "URI", value: "spiffe://x/y" },
    { type: "IP Address", value: "10.0.0.1" },
    { type: "DNS", value: "b,c" },
  ]);
  t.same(parseSubjectAltName(undefined), []);
});

t.test("XFCC in Envoy's format, values with separators quoted", async (t) => {
  const value = xfccValue(
    "auth.ashchan.local",
    peer("gateway.ashchan.local", { uris: ["spiffe://ashchan.local/gw"], subject: 'CN=gw,O=A "B", C' }),
  );
  t.equal(
    value,
    `By=auth.ashchan.local;Hash=${"ab".repeat(32)};Subject="CN=gw,O=A \\"B\\", C";URI=spiffe://ashchan.local/gw;DNS=gateway.ashchan.local`,
  );
});

t.test("a URI entry keeps its case, as the certificate's URI SAN does; DNS names ignore case", async (t) => {
  const uri = peer("media.ashchan.local", { uris: ["https://ashchan.local/Services/Media"] });
  t.equal(authorize(compilePolicy({ allow: ["https://ashchan.local/Services/Media"] }), uri, "GET", "/").allowed, true);
  t.equal(
    authorize(compilePolicy({ allow: ["https://ashchan.local/services/media"] }), uri, "GET", "/").allowed,
    false,
  );
  t.equal(authorize(compilePolicy({ allow: ["MEDIA.ashchan.local"] }), uri, "GET", "/").allowed, true);
});
