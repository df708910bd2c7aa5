// Test oracle for the GPT-2 tokenizer: js-tiktoken's "gpt2" encoding, ordinary
// (special-token text is plain text). Reads a JSON array of strings on stdin and
// prints a JSON array with the ids of each.
// Usage: node tiktoken_oracle.js NODE_MODULES_DIR < texts.json
'use strict';
const path = require('path');

const modulesDir = process.argv[2] || process.env.SPEEDRUN_NODE_MODULES;
if (!modulesDir) {
  console.error('usage: node tiktoken_oracle.js NODE_MODULES_DIR < texts.json');
  process.exit(2);
}
let tiktoken;
try {
  tiktoken = require(path.resolve(modulesDir, 'js-tiktoken'));
} catch (e) {
  console.error(`js-tiktoken not found in ${modulesDir} (${e.message}); run scripts/setup.sh`);
  process.exit(3);
}

const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => {
  const texts = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const enc = tiktoken.getEncoding('gpt2');
  // allowedSpecial = [], disallowedSpecial = []: "<|endoftext|>" is encoded as text.
  const ids = texts.map((t) => enc.encode(t, [], []));
  process.stdout.write(JSON.stringify(ids));
});
