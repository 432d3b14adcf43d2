//! Which batches a rank reads, in which order: a seeded permutation of the cube's chunks per epoch, split
//! into equal shares per rank.
//!
//! Rules (the same in Rust and Python, whatever the thread count):
//! - The eligible chunks are those whose stored valid fraction reaches the loader's threshold, in natural
//!   order `(time, lat, lon)`.
//! - Epoch `e` permutes them with a `ChaCha8` generator seeded from `(seed, e)` (no permutation without shuffle).
//! - With W ranks, each rank gets `floor(n / W)` chunks: rank r takes positions `r·k .. (r+1)·k` of the
//!   permutation, `k = floor(n / W)`. The last `n mod W` chunks of each epoch's permutation are left out, so
//!   every rank runs the same number of steps and distributed training never waits on an uneven last batch;
//!   with shuffling, a different few are left out each epoch.
//! - Data-loader workers of one rank (e.g. `PyTorch` `num_workers`) split the rank's share without losing
//!   any: worker i of n takes positions `i, i + n, i + 2n, ...` of it.
//! - Mixing over K chunks groups the rank's order into consecutive groups of K (the last may be smaller).

use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// A chunk of the cube: `[time, lat, lon]` chunk indices.
pub type ChunkId = [usize; 3];

/// Which share of the batches one reader takes: rank of a distributed job, and worker within the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Rank (0-based).
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Worker within the rank (0-based).
    pub worker: usize,
    /// Workers per rank.
    pub workers: usize,
}

impl Share {
    /// Everything: one rank, one worker.
    pub const ALL: Share = Share { rank: 0, world_size: 1, worker: 0, workers: 1 };
}

/// The order of one rank.
#[derive(Debug)]
pub struct Sampler {
    eligible: Vec<ChunkId>,
    seed: u64,
    shuffle: bool,
    share: Share,
    mix: usize,
    cache: Mutex<Vec<(usize, Arc<Vec<ChunkId>>)>>,
}

/// Derives a generator for `(seed, stream, index)`: independent streams for epochs and for mixing.
#[must_use]
pub fn rng_for(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos(u128::from(index) << 20);
    rng
}

impl Sampler {
    /// A sampler over `eligible` chunks (natural order).
    #[must_use]
    pub fn new(eligible: Vec<ChunkId>, seed: u64, shuffle: bool, share: Share, mix: usize) -> Self {
        Sampler { eligible, seed, shuffle, share, mix: mix.max(1), cache: Mutex::new(Vec::new()) }
    }

    /// Batches per epoch for this rank (all workers together).
    #[must_use]
    pub fn rank_share(&self) -> usize {
        self.eligible.len() / self.share.world_size
    }

    /// Batches per epoch for this rank and worker.
    #[must_use]
    pub fn per_epoch(&self) -> usize {
        let Share { worker, workers, .. } = self.share;
        (self.rank_share() + workers - 1 - worker) / workers
    }

    /// Jobs (groups of up to `mix` batches) per epoch.
    #[must_use]
    pub fn jobs_per_epoch(&self) -> usize {
        self.per_epoch().div_ceil(self.mix)
    }

    /// Batches per job.
    #[must_use]
    pub fn mix(&self) -> usize {
        self.mix
    }

    /// This rank's chunks for `epoch`, in delivery order.
    #[must_use]
    pub fn epoch_order(&self, epoch: usize) -> Arc<Vec<ChunkId>> {
        let mut cache = self.cache.lock().expect("sampler cache");
        if let Some((_, order)) = cache.iter().find(|(e, _)| *e == epoch) {
            return order.clone();
        }
        let mut all = self.eligible.clone();
        if self.shuffle {
            all.shuffle(&mut rng_for(self.seed, 0, epoch as u64));
        }
        let k = self.rank_share();
        let Share { rank, worker, workers, .. } = self.share;
        let order: Arc<Vec<ChunkId>> =
            Arc::new(all[rank * k..(rank + 1) * k].iter().skip(worker).step_by(workers).copied().collect());
        if cache.len() >= 4 {
            cache.remove(0);
        }
        cache.push((epoch, order.clone()));
        order
    }

    /// Batches in the jobs before job `job` (counted from the first epoch's first): a job holds `mix`
    /// batches, the last of an epoch those left.
    #[must_use]
    pub fn batches_before(&self, job: usize) -> usize {
        let per = self.jobs_per_epoch().max(1);
        job / per * self.per_epoch() + (job % per * self.mix).min(self.per_epoch())
    }

    /// The chunks of job `job` (counted from the first epoch): `(epoch, first position, chunks)`.
    #[must_use]
    pub fn job(&self, job: usize) -> (usize, usize, Vec<ChunkId>) {
        let per = self.jobs_per_epoch().max(1);
        let (epoch, j) = (job / per, job % per);
        let order = self.epoch_order(epoch);
        let start = j * self.mix;
        let end = (start + self.mix).min(order.len());
        (epoch, start, order[start..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<ChunkId> {
        (0..n).map(|i| [0, i / 7, i % 7]).collect()
    }

    proptest! {
        /// Per epoch, ranks get disjoint, equal shares, and together all but fewer than W chunks.
        #[test]
        fn shards_are_disjoint_and_balanced(n in 0usize..200, world in 1usize..6, seed in 0u64..1000, epoch in 0usize..5) {
            let samplers: Vec<Sampler> = (0..world)
                .map(|r| Sampler::new(ids(n), seed, true, Share { rank: r, world_size: world, ..Share::ALL }, 1))
                .collect();
            let mut seen = std::collections::HashSet::new();
            for s in &samplers {
                let order = s.epoch_order(epoch);
                prop_assert_eq!(order.len(), n / world);
                for id in order.iter() {
                    prop_assert!(seen.insert(*id), "chunk {:?} given twice", id);
                }
            }
            prop_assert!(n - seen.len() < world);
        }

        /// A single rank sees a permutation of every chunk, different per epoch, the same for the same seed.
        #[test]
        fn shuffle_is_a_seeded_permutation(n in 1usize..200, seed in 0u64..1000) {
            let s = Sampler::new(ids(n), seed, true, Share::ALL, 1);
            let mut order = s.epoch_order(0).to_vec();
            let again = Sampler::new(ids(n), seed, true, Share::ALL, 1).epoch_order(0);
            prop_assert_eq!(&order, &*again);
            order.sort_unstable();
            prop_assert_eq!(order, ids(n).into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn workers_split_a_rank_without_loss() {
        let rank = Sampler::new(ids(23), 3, true, Share { rank: 1, world_size: 2, ..Share::ALL }, 1);
        let mut joined: Vec<ChunkId> = (0..3)
            .flat_map(|w| {
                let share = Share { rank: 1, world_size: 2, worker: w, workers: 3 };
                let s = Sampler::new(ids(23), 3, true, share, 1);
                assert_eq!(s.per_epoch(), s.epoch_order(2).len());
                s.epoch_order(2).to_vec()
            })
            .collect();
        let mut whole = rank.epoch_order(2).to_vec();
        joined.sort_unstable();
        whole.sort_unstable();
        assert_eq!(joined, whole);
    }

    #[test]
    fn epochs_differ_and_jobs_group_by_mix() {
        let s = Sampler::new(ids(50), 7, true, Share::ALL, 4);
        assert_ne!(s.epoch_order(0), s.epoch_order(1));
        assert_eq!(s.jobs_per_epoch(), 13);
        let (epoch, start, chunks) = s.job(13);
        assert_eq!((epoch, start, chunks.len()), (1, 0, 4));
        let (_, start, chunks) = s.job(12);
        assert_eq!((start, chunks.len()), (48, 2));
        let plain = Sampler::new(ids(5), 7, false, Share::ALL, 1);
        assert_eq!(*plain.epoch_order(3), ids(5));
        // The batches of the jobs before each job, against the jobs' own chunks counted.
        for job in 0..40 {
            let counted: usize = (0..job).map(|j| s.job(j).2.len()).sum();
            assert_eq!(s.batches_before(job), counted, "job {job}");
        }
    }
}
