// Every client snippet of the docs is run or says why not: a block in a
// js/javascript/python/sh/bash fence that uses a client (CLIENT_PATTERNS:
// `io(`, `new WebSocket`, `websockets`, `curl `, `mosquitto_pub`, …) must be
// marked `<!-- run: CHECK -->` with a known check, or `<!-- norun: REASON -->`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CHECKS, OPTIONS } from './checks.mjs';
import { REPO } from './lib/harness.mjs';
import { clientPatterns, parseDocs, parseMarkdown } from './lib/markdown.mjs';

/** What is wrong with the markers of `blocks` (and the stray markers). */
function problems({ blocks, stray }) {
  const out = [];
  for (const b of blocks) {
    const at = `${b.file}:${b.line}`;
    if (b.markerError) out.push(`${at}: ${b.markerError}`);
    const uses = clientPatterns(b);
    if (uses.length > 0 && !b.marker && !b.markerError) {
      out.push(
        `${at}: a \`${b.lang}\` block using ${uses.map((u) => JSON.stringify(u)).join(', ')} is neither ` +
          'marked <!-- run: CHECK --> nor <!-- norun: REASON -->',
      );
    }
    if (b.marker?.kind === 'run') {
      if (!CHECKS[b.marker.check]) {
        out.push(`${at}: unknown check \`${b.marker.check}\` (checks.mjs has ${Object.keys(CHECKS).join(', ')})`);
      }
      for (const o of b.marker.options) if (!OPTIONS[o]) out.push(`${at}: unknown option \`${o}\``);
    }
  }
  for (const s of stray) out.push(`${s.file}:${s.line}: a marker with no code block after it: ${s.text}`);
  return out;
}

test('every client snippet in README.md and docs/*.md is marked run or norun', () => {
  assert.deepEqual(problems(parseDocs(REPO)), []);
});

test('an unmarked client snippet, a bad marker and a stray marker are reported', () => {
  const doc = [
    'Text.',
    '',
    '```js',
    "const s = io('http://127.0.0.1:1337/notifications');",
    '```',
    '',
    '<!-- run: no-such-check -->',
    '```sh',
    'curl -s http://127.0.0.1:1337/healthz',
    '```',
    '',
    '<!-- norun -->',
    '```python',
    'import websockets',
    '```',
    '',
    '<!-- run: sh -->',
    'A paragraph, not a block.',
    '',
    '  <!-- norun: an output example -->',
    '  ```sh',
    '  mosquitto_pub -t a -m 1',
    '  ```',
    '',
    '```toml',
    'url = "curl "',
    '```',
  ].join('\n');
  const parsed = parseMarkdown(doc, 'x.md');
  assert.deepEqual(
    parsed.blocks.map((b) => [b.line, b.lang, b.marker?.kind ?? null]),
    [
      [3, 'js', null],
      [8, 'sh', 'run'],
      [13, 'python', null],
      [21, 'sh', 'norun'],
      [25, 'toml', null],
    ],
  );
  assert.equal(parsed.blocks[3].code, 'mosquitto_pub -t a -m 1\n', 'an indented block is dedented');
  const found = problems(parsed);
  assert.equal(found.length, 4, found.join('\n'));
  assert.match(found[0], /^x\.md:3: a `js` block using "io\(" is neither marked/);
  assert.match(found[1], /^x\.md:8: unknown check `no-such-check`/);
  assert.match(found[2], /^x\.md:13: .*gives no reason/);
  assert.match(found[3], /^x\.md:17: a marker with no code block after it/);
});
