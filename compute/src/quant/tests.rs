use super::*;

fn reference_cases() -> Vec<(GgmlType, Vec<u8>, Vec<f32>)> {
    let text = include_str!("../../fixtures/quant_reference.json");
    let json: serde_json::Value = serde_json::from_str(text).expect("fixture parses");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let dtype = match case["type"].as_str().expect("type") {
                "Q4_0" => GgmlType::Q4_0,
                "Q4_1" => GgmlType::Q4_1,
                "Q8_0" => GgmlType::Q8_0,
                "Q4_K" => GgmlType::Q4K,
                "Q6_K" => GgmlType::Q6K,
                "F16" => GgmlType::F16,
                "BF16" => GgmlType::BF16,
                other => panic!("unexpected type {other}"),
            };
            let hex = case["bytes_hex"].as_str().expect("hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
                .collect();
            let values = case["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            (dtype, bytes, values)
        })
        .collect()
}

/// Every dequantiser against the independent gguf-py implementation. Both compute in f32
/// from the same f16 scales; we allow one ulp-scale slack for differing operation order.
#[test]
fn dequantisers_match_gguf_py_reference() {
    let cases = reference_cases();
    let mut seen = std::collections::HashSet::new();
    for (dtype, bytes, expected) in cases {
        seen.insert(dtype);
        let mut out = vec![f32::NAN; expected.len()];
        dequantize(dtype, &bytes, &mut out);
        for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
            let tol = 1e-6 * want.abs().max(1e-3);
            assert!(
                (got - want).abs() <= tol,
                "{dtype:?} element {i}: got {got}, want {want}"
            );
        }
    }
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        assert!(seen.contains(&dtype), "{dtype:?} has no reference case");
    }
}

/// Hand-computed values: d = 0.5, m = -1, nibbles 0..15 then 15..0.
#[test]
fn q4_1_known_values() {
    let mut qs = [0u8; 16];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = (j as u8) | ((15 - j as u8) << 4);
    }
    let block = BlockQ4_1 {
        d: f16::from_f32(0.5),
        m: f16::from_f32(-1.0),
        qs,
    };
    let mut out = [0f32; 32];
    dequantize(GgmlType::Q4_1, bytemuck::bytes_of(&block), &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
    }
}

#[test]
fn q8_0_known_values() {
    let mut qs = [0i8; 32];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = j as i8 - 16;
    }
    let block = BlockQ8_0 {
        d: f16::from_f32(0.25),
        qs,
    };
    let mut out = [0f32; 32];
    dequantize(GgmlType::Q8_0, bytemuck::bytes_of(&block), &mut out);
    for (j, v) in out.iter().enumerate() {
        assert_eq!(*v, (j as f32 - 16.0) * 0.25);
    }
}

#[test]
fn float_encodings_round_trip() {
    let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    for dtype in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let bytes = encode_float(dtype, &values).expect("float type");
        let mut out = vec![0f32; values.len()];
        dequantize(dtype, &bytes, &mut out);
        let tol = match dtype {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 2e-3,
            _ => 2e-2,
        };
        for (a, b) in out.iter().zip(&values) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{dtype:?}: {a} vs {b}"
            );
        }
    }
}
