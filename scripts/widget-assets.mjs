// Copies the pinned widget JavaScript from node_modules into book/_widgets/, which the book
// config serves as a static path (-> _static/ in the built site). The html-manager loads its
// fonts from "<cdn>@jupyter-widgets/html-manager/dist/", so the folder keeps that layout and the
// page points the CDN at "_static/". The bundles compute their font URLs from the AMD id that
// loaded them ("@jupyter-widgets/controls" -> "@jupyter-widgets/"), so the fonts also sit one
// level up. Runs as npm's postinstall (npm ci / npm install).
import { cpSync, mkdirSync, readdirSync, rmSync } from "node:fs";

const out = "book/_widgets";
rmSync(out, { recursive: true, force: true });
mkdirSync(`${out}/@jupyter-widgets/html-manager`, { recursive: true });
cpSync("node_modules/requirejs/require.js", `${out}/require.js`);
const dist = "node_modules/@jupyter-widgets/html-manager/dist";
mkdirSync(`${out}/@jupyter-widgets/html-manager/dist`, { recursive: true });
for (const name of ["embed-amd.js", "embed.js.LICENSE.txt"]) {
  cpSync(`${dist}/${name}`, `${out}/@jupyter-widgets/html-manager/dist/${name}`);
}
for (const name of readdirSync(dist).filter((f) => /\.(woff2?|ttf|eot|svg)$/.test(f))) {
  cpSync(`${dist}/${name}`, `${out}/@jupyter-widgets/html-manager/dist/${name}`);
  cpSync(`${dist}/${name}`, `${out}/@jupyter-widgets/${name}`);
}
console.log(`widget assets copied to ${out}`);
