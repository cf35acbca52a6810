import t from "tap";
import { parseConfig } from "../config/load.js";

t.test("parses", async (t) => {
  const c = parseConfig({ service: { name: "a", dnsName: "a.b.c" } });
  t.equal(c.inbound.listen.port, 8443);
});
