// Finds the fenced code blocks of a Markdown file and the marker just above
// each one:
//
//   <!-- run: CHECK [OPTION ...] -->   run the block; CHECK (checks.mjs) says how
//   <!-- norun: REASON -->             a client snippet that is deliberately not run
//
// The marker is the last non-blank line before the opening fence. GitHub
// renders neither (an HTML comment), so the page reads the same.
import { readFileSync, readdirSync } from 'node:fs';
import { join, relative } from 'node:path';

/** README.md and docs/*.md of the repository at `root`, as paths relative to it. */
export function docFiles(root) {
  const docs = readdirSync(join(root, 'docs'))
    .filter((f) => f.endsWith('.md'))
    .sort()
    .map((f) => `docs/${f}`);
  return ['README.md', ...docs];
}

const FENCE = /^( *)(`{3,}|~{3,})\s*([^`]*)$/;
const MARKER = /^\s*<!--\s*(run|norun)\b\s*(:?)\s*(.*?)\s*-->\s*$/;

/**
 * The blocks of `text`: { file, line (1-based, of the opening fence), lang,
 * info, code (dedented by the fence's indent), marker, markerError, next }
 * where marker is null or { kind: 'run', check, options } or
 * { kind: 'norun', reason }, and next is the following block (expected
 * output, for some checks). Also returns the markers that precede no fence.
 */
export function parseMarkdown(text, file = '<text>') {
  const lines = text.split('\n');
  const blocks = [];
  const stray = [];
  let lastNonBlank = null; // { index, text }
  for (let i = 0; i < lines.length; i++) {
    const open = FENCE.exec(lines[i]);
    if (!open) {
      if (lines[i].trim() !== '') {
        if (lastNonBlank && MARKER.test(lastNonBlank.text)) {
          stray.push({ file, line: lastNonBlank.index + 1, text: lastNonBlank.text.trim() });
        }
        lastNonBlank = { index: i, text: lines[i] };
      }
      continue;
    }
    const [, indent, fence, infoRaw] = open;
    const info = infoRaw.trim();
    const body = [];
    let j = i + 1;
    const close = new RegExp(`^ {0,${indent.length + 3}}${fence[0]}{${fence.length},}\\s*$`);
    for (; j < lines.length && !close.test(lines[j]); j++) {
      body.push(lines[j].startsWith(indent) ? lines[j].slice(indent.length) : lines[j].trimStart());
    }
    const block = {
      file,
      line: i + 1,
      lang: info.split(/\s+/)[0].toLowerCase(),
      info,
      code: body.join('\n') + '\n',
      marker: null,
      markerError: null,
      next: null,
    };
    if (lastNonBlank && MARKER.test(lastNonBlank.text)) {
      const [, kind, colon, rest] = MARKER.exec(lastNonBlank.text);
      if (kind === 'run') {
        const words = rest.split(/\s+/).filter(Boolean);
        if (colon !== ':' || words.length === 0) {
          block.markerError = `"<!-- run: CHECK -->" names no check: ${lastNonBlank.text.trim()}`;
        } else {
          block.marker = { kind, check: words[0], options: words.slice(1) };
        }
      } else if (colon !== ':' || rest === '') {
        block.markerError = `"<!-- norun: REASON -->" gives no reason: ${lastNonBlank.text.trim()}`;
      } else {
        block.marker = { kind, reason: rest };
      }
    }
    if (blocks.length > 0) blocks[blocks.length - 1].next = block;
    blocks.push(block);
    lastNonBlank = { index: j, text: lines[j] ?? '' };
    i = j;
  }
  if (lastNonBlank && MARKER.test(lastNonBlank.text)) {
    stray.push({ file, line: lastNonBlank.index + 1, text: lastNonBlank.text.trim() });
  }
  return { blocks, stray };
}

/** Every block of every documentation file under `root`. */
export function parseDocs(root) {
  const blocks = [];
  const stray = [];
  for (const file of docFiles(root)) {
    const parsed = parseMarkdown(readFileSync(join(root, file), 'utf8'), relative(root, join(root, file)));
    blocks.push(...parsed.blocks);
    stray.push(...parsed.stray);
  }
  return { blocks, stray };
}

/** Fence languages whose blocks a user pastes into a program or a shell. */
export const CLIENT_LANGS = new Set(['js', 'javascript', 'mjs', 'cjs', 'python', 'py', 'sh', 'bash', 'shell', 'console']);

/** What makes such a block a client snippet that must be run (or say why not). */
export const CLIENT_PATTERNS = [
  'io(',
  'io.connect(',
  'io.socket.',
  'io.sails',
  'socket.io-client',
  'sails.io.js',
  'new WebSocket',
  "from 'ws'",
  "require('ws')",
  'websockets',
  'curl ',
  'mosquitto_pub',
  'mosquitto_sub',
  'wscat',
  'websocat',
];

/** The patterns `block` contains, when it is in a client language. */
export function clientPatterns(block) {
  if (!CLIENT_LANGS.has(block.lang)) return [];
  return CLIENT_PATTERNS.filter((p) => block.code.includes(p));
}
