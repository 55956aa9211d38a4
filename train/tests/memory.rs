//! Checkpointed layers and the chunked loss change a training pass's memory, not its result:
//! the peak of live heap bytes (this test binary counts every allocation; burn's CPU backend
//! keeps its tensors on the heap) of one forward and backward pass, with and without them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_train::ModelConfig;
use kiln_train::backprop::{Memory, backward};
use kiln_train::learned::{Sequence, pack};
use kiln_train::weights::{build_decoder, random_weights};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn checkpointed_layers_and_a_chunked_loss_hold_less_memory() {
    let device = kiln_train::default_device().autodiff();
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true
    }))
    .unwrap();
    let decoder = build_decoder(&config, random_weights(&config, 1), std::path::Path::new("t"), &device).unwrap();
    let mut rng = fastrand::Rng::with_seed(2);
    let seqs: Vec<Sequence> = (0..2)
        .map(|_| Sequence { ids: (0..513).map(|_| rng.u32(..4096)).collect(), learn: vec![true; 513], weight: 1.0 })
        .collect();
    let packed = pack(&seqs.iter().collect::<Vec<_>>());
    let tokens = packed.rows.len() as f64;

    // Peak bytes above what was live before the pass, and the loss.
    let pass = |memory: Memory| {
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let (loss, grads) =
            backward(&decoder, &config, &packed, &device, memory, |logp, _| logp.sum().neg().div_scalar(tokens));
        drop(grads);
        (PEAK.load(Ordering::Relaxed) - before, loss)
    };
    let whole = Memory { checkpoint_layers: false, loss_chunk: 1 << 20, attention_block: 1 << 20 };
    let (plain, loss) = pass(whole);
    let (chunked, chunked_loss) = pass(Memory { loss_chunk: 128, ..whole });
    let (both, both_loss) = pass(Memory { checkpoint_layers: true, loss_chunk: 128, ..whole });
    let (all, all_loss) = pass(Memory { checkpoint_layers: true, loss_chunk: 128, attention_block: 128 });
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "peak MiB: plain {:.1}, chunked loss {:.1}, + checkpointed layers {:.1}, + attention in blocks {:.1}",
        mib(plain),
        mib(chunked),
        mib(both),
        mib(all)
    );
    for other in [chunked_loss, both_loss, all_loss] {
        assert!((other - loss).abs() < 1e-4, "{loss} vs {other}");
    }
    // The [1024, 4096] f32 logits (16 MiB, and their softmax and gradient) are never whole.
    assert!(chunked + (24 << 20) < plain, "the chunked loss saves at least 24 MiB: {} vs {}", mib(chunked), mib(plain));
    // One layer's activations instead of six.
    assert!((both as f64) < 0.5 * chunked as f64, "checkpointing halves the rest: {} vs {}", mib(both), mib(chunked));
    // One layer's [2, 4, 512, 512] attention scores (and softmax, gradients) a quarter at a time.
    assert!(all + (4 << 20) < both, "attention in query blocks saves at least 4 MiB: {} vs {}", mib(all), mib(both));
}
