//! Prompt/completion JSONL: rows mask prompt targets and padding with IGNORE_TARGET, the
//! validation split is the end of each file, the EOS token is appended, the loader resumes
//! exactly from its state, and malformed lines are errors naming the file and line.

mod common;

use std::path::PathBuf;

use datasets::{CompletionDataset, Split, TokenizerSpec, IGNORE_TARGET};

fn smollm_tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/smollm2-135m-instruct/tokenizer.json")
}

fn qa_lines(n: usize) -> String {
    (0..n).map(|i| format!("{{\"prompt\": \"Q: capital of country{i}?\", \"completion\": \" A: city{i}\"}}\n")).collect()
}

#[test]
fn rows_count_completion_targets_only_and_val_is_the_end_of_each_file() {
    let dir = common::temp_dir("completions-rows");
    let a = common::write_text(&dir, "a.jsonl", &qa_lines(10));
    let b = common::write_text(&dir, "b.jsonl", &format!("\n{}", qa_lines(5)));
    let data = CompletionDataset::load(&[a, b], TokenizerSpec::Char, 0.2).unwrap();
    assert_eq!(data.eos(), None, "a character vocabulary has no EOS");
    let (train, val) = (data.examples(Split::Train), data.examples(Split::Val));
    assert_eq!((train.len(), val.len()), (8 + 4, 2 + 1));
    // The last 20% of each file (at least one); line numbers count the blank line.
    assert_eq!(val.iter().map(|e| (e.source, e.line)).collect::<Vec<_>>(), vec![(0, 9), (0, 10), (1, 6)]);

    let tok = data.tokenizer();
    let context = 40;
    let batches = data.val_batches(2, context, 10).unwrap();
    assert_eq!(batches.len(), 2, "3 val examples in batches of 2: the last one is padded");
    let row = |b: &datasets::Batch, r: usize| (b.inputs[r * context..(r + 1) * context].to_vec(), b.targets[r * context..(r + 1) * context].to_vec());
    let (inputs, targets) = row(&batches[0], 0);
    let prompt = tok.encode("Q: capital of country8?").unwrap();
    let completion = tok.encode(" A: city8").unwrap();
    let full: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
    assert_eq!(&inputs[..full.len()], &full[..]);
    for (t, &target) in targets.iter().enumerate() {
        let expected = if t + 1 >= prompt.len() && t + 1 < full.len() { full[t + 1] } else { IGNORE_TARGET };
        assert_eq!(target, expected, "position {t}");
    }
    assert_eq!(targets.iter().filter(|&&t| t != IGNORE_TARGET).count(), completion.len());
    let (_, padded) = row(&batches[1], 1);
    assert!(padded.iter().all(|&t| t == IGNORE_TARGET), "the filler row counts nothing");

    // A context too short for any completion token is an error naming the file and line.
    let e = data.loader(2, prompt.len() - 1, 1).unwrap_err().to_string();
    assert!(e.contains("a.jsonl") && e.contains("line 1:"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loader_state_resumes_exactly_and_is_refused_by_a_text_loader() {
    let dir = common::temp_dir("completions-resume");
    let a = common::write_text(&dir, "a.jsonl", &qa_lines(30));
    let data = CompletionDataset::load(&[a], TokenizerSpec::Char, 0.1).unwrap();
    let mut l1 = data.loader(4, 32, 7).unwrap();
    let _ = (l1.next_batch(), l1.next_batch());
    let state = l1.state();
    assert_eq!(state.examples, Some(27));
    let json = serde_json::to_string(&state).unwrap();
    let mut l2 = data.loader(4, 32, 7).unwrap();
    l2.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    for _ in 0..5 {
        assert_eq!(l1.next_batch(), l2.next_batch());
    }
    let mut other = data.loader(4, 31, 7).unwrap();
    assert!(other.restore(&state).is_err(), "another seq_len must not restore");

    let tokens: std::sync::Arc<[u32]> = (0..100u32).map(|i| i % 7).collect::<Vec<_>>().into();
    let mut text = datasets::BatchLoader::new(tokens, Split::Train, 4, 32, 7).unwrap();
    let e = text.restore(&state).unwrap_err().to_string();
    assert!(e.contains("prompt/completion"), "{e}");
    // A text loader's state has no `examples` key: old checkpoints still parse.
    let text_json = serde_json::to_string(&text.state()).unwrap();
    assert!(!text_json.contains("examples"), "{text_json}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn huggingface_tokenizer_appends_eos() {
    let dir = common::temp_dir("completions-eos");
    let a = common::write_text(&dir, "a.jsonl", &qa_lines(4));
    let data = CompletionDataset::load(&[a], TokenizerSpec::HuggingFace(smollm_tokenizer()), 0.25).unwrap();
    // SmolLM2-Instruct's tokenizer_config.json names <|im_end|> (id 2).
    assert_eq!(data.eos(), Some(2));
    let e = &data.examples(Split::Train)[0];
    assert_eq!(e.tokens.last(), Some(&2));
    // Without a tokenizer_config.json the first usual name that is a token: <|endoftext|> (0).
    let copy = dir.join("tokenizer.json");
    std::fs::copy(smollm_tokenizer(), &copy).unwrap();
    let a = dir.join("a.jsonl");
    let data = CompletionDataset::load(&[a], TokenizerSpec::HuggingFace(copy), 0.25).unwrap();
    assert_eq!(data.eos(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_lines_name_the_file_and_line() {
    let dir = common::temp_dir("completions-bad");
    let good = qa_lines(3);
    for (bad, what) in [
        ("not json at all", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{\"prompt\": \"Q\"}", "missing key \"completion\""),
        ("{\"completion\": \"A\"}", "missing key \"prompt\""),
        ("{\"prompt\": \"Q\", \"completion\": \"\"}", "empty \"completion\""),
        ("{\"prompt\": 3, \"completion\": \"A\"}", "\"prompt\" is not a string"),
    ] {
        let path = common::write_text(&dir, "bad.jsonl", &format!("{good}{bad}\n{good}"));
        let e = CompletionDataset::load(std::slice::from_ref(&path), TokenizerSpec::Char, 0.1).unwrap_err();
        assert_eq!(e.path(), Some(path.as_path()));
        let msg = e.to_string();
        assert!(msg.contains("bad.jsonl: line 4: ") && msg.contains(what), "{msg}");
    }
    let empty = common::write_text(&dir, "empty.jsonl", "\n\n");
    assert!(CompletionDataset::load(&[empty], TokenizerSpec::Char, 0.1).unwrap_err().to_string().contains("no examples"));
    let text = common::write_text(&dir, "t.txt", "hello");
    assert!(CompletionDataset::load(&[text], TokenizerSpec::Char, 0.1).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
