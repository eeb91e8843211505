use super::writer::GgufWriter;
use super::*;
use crate::quant::encode_float;

fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f
}

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(2))
        .meta("llama.rope.freq_base", MetaValue::F32(10000.0))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("b".into()),
            ]),
        );
    let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
    w.tensor(
        "x.weight",
        &[32, 2],
        GgmlType::F32,
        encode_float(GgmlType::F32, &values).unwrap(),
    );
    w.tensor(
        "y.weight",
        &[64],
        GgmlType::F16,
        encode_float(GgmlType::F16, &values).unwrap(),
    );
    w.to_bytes()
}

#[test]
fn reads_metadata_and_tensors_back() {
    let f = write_tmp(&sample());
    let g = GgufFile::open(f.path()).expect("opens");
    assert_eq!(g.version(), 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap(),
        vec!["a", "b"]
    );
    let names: Vec<_> = g.tensor_infos().map(|t| t.name.clone()).collect();
    assert_eq!(names, vec!["x.weight", "y.weight"]);
    let x = g.tensor("x.weight").unwrap();
    assert_eq!(x.info.dims, vec![32, 2]);
    let mut out = vec![0f32; 64];
    crate::quant::dequantize(x.info.dtype, x.data, &mut out);
    assert_eq!(out[63], 31.5);
    let y = g.tensor("y.weight").unwrap();
    crate::quant::dequantize(y.info.dtype, y.data, &mut out);
    assert_eq!(out[10], 5.0);
}

#[test]
fn rejects_bad_files_with_errors_not_panics() {
    let good = sample();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_version = good.clone();
    bad_version[4] = 1;
    let mut huge_string = good.clone();
    // The first key's length field sits right after the 24-byte header.
    huge_string[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad magic", bad_magic, "magic"),
        ("bad version", bad_version, "version"),
        ("huge string", huge_string, "cap"),
        (
            "truncated",
            good[..good.len() - 40].to_vec(),
            "past the end",
        ),
        ("header only", good[..20].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
    ];
    for (name, bytes, needle) in cases {
        let f = write_tmp(&bytes);
        match GgufFile::open(f.path()) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(
                e.to_string().contains(needle),
                "{name}: error `{e}` lacks `{needle}`"
            ),
        }
    }
}

#[test]
fn missing_metadata_and_tensors_are_named_in_errors() {
    let f = write_tmp(&sample());
    let g = GgufFile::open(f.path()).unwrap();
    let e = g.get_u64("llama.nope").unwrap_err().to_string();
    assert!(e.contains("llama.nope"), "{e}");
    let e = g.get_u64("general.architecture").unwrap_err().to_string();
    assert!(e.contains("unsigned"), "{e}");
    let e = g.tensor("z.weight").err().expect("missing").to_string();
    assert!(e.contains("z.weight"), "{e}");
}
