// Generates src/schema.ts from openapi.json with openapi-typescript, then
// gives the document's recursive JsonValue (any JSON a record can hold) a
// named recursive type: TypeScript cannot resolve a schema that refers to
// itself through an array by indexed access (`components[...]["JsonValue"][]`).
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";

const out = new URL("../src/schema.ts", import.meta.url);
execFileSync(
  process.execPath,
  [new URL("../node_modules/openapi-typescript/bin/cli.js", import.meta.url).pathname, "openapi.json", "-o", "src/schema.ts"],
  { stdio: "inherit", cwd: new URL("..", import.meta.url).pathname },
);
const generated = readFileSync(out, "utf8");
const recursive = /JsonValue: null \| boolean \| number \| string \| components\["schemas"\]\["JsonValue"\]\[\] \| components\["schemas"\]\["RecordData"\];/;
if (!recursive.test(generated)) {
  throw new Error("schema.ts: the JsonValue definition changed; update scripts/generate.mjs");
}
const fixed =
  generated.replace(recursive, "JsonValue: JsonValue;") +
  "\n/** Any JSON a record can hold (strings without U+0000). */\n" +
  "export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };\n";
writeFileSync(out, fixed);
