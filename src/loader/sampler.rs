//! Which batches a rank reads, in which order: a seeded permutation of the cube's chunks per epoch, split
//! into equal shares per rank.
//!
//! Rules (the same in Rust and Python, whatever the thread count):
//! - The eligible chunks are those whose valid fraction (over their cells inside the cube) reaches the
//!   loader's threshold, in natural order `(time, lat, lon)`.
//! - Epoch `e` permutes them with a `ChaCha8` generator seeded from `(seed, e)` (no permutation without shuffle).
//! - With W ranks, each rank gets `floor(n / W)` chunks: rank r takes positions `r·k .. (r+1)·k` of the
//!   permutation, `k = floor(n / W)`. The last `n mod W` chunks of each epoch's permutation are left out, so
//!   every rank runs the same number of steps and distributed training never waits on an uneven last batch;
//!   with shuffling, a different few are left out each epoch.
//! - Mixing over K chunks groups the rank's order into consecutive groups of K (the last may be smaller).
//! - Data-loader workers of one rank (e.g. `PyTorch` `num_workers`) split the rank's groups without losing
//!   any: worker i of n takes groups `i, i + n, i + 2n, ...`. A batch's chunks, and so its samples, are
//!   therefore the same whatever the number of workers (only the order in which the workers' batches
//!   interleave depends on it); without mixing, worker i takes positions `i, i + n, ...`.
//! - A batch's position is its place in the rank's order (the first of its group's positions plus its index in
//!   the group), the same for every number of workers; a worker's cursor counts the batches of its own share.

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

    /// The chunks an epoch takes its batches from, all ranks together.
    #[must_use]
    pub fn eligible_count(&self) -> usize {
        self.eligible.len()
    }

    /// Batches per epoch for this rank (all workers together).
    #[must_use]
    pub fn rank_share(&self) -> usize {
        self.eligible.len() / self.share.world_size
    }

    /// Groups of up to `mix` chunks in the rank's share.
    fn rank_groups(&self) -> usize {
        self.rank_share().div_ceil(self.mix)
    }

    /// Jobs (groups of up to `mix` batches) per epoch for this worker: groups `worker, worker + workers, ...`.
    #[must_use]
    pub fn jobs_per_epoch(&self) -> usize {
        let Share { worker, workers, .. } = self.share;
        self.rank_groups().saturating_sub(worker).div_ceil(workers)
    }

    /// Batches per epoch for this rank and worker: its groups, all full but the rank's last.
    #[must_use]
    pub fn per_epoch(&self) -> usize {
        let jobs = self.jobs_per_epoch();
        if jobs == 0 {
            return 0;
        }
        let last_group = self.share.worker + (jobs - 1) * self.share.workers;
        (jobs - 1) * self.mix + (self.rank_share() - last_group * self.mix).min(self.mix)
    }

    /// Batches per job.
    #[must_use]
    pub fn mix(&self) -> usize {
        self.mix
    }

    /// A digest of what chooses the batches besides the seed, the share and the mixing: the variables
    /// (sorted) and the eligible chunks. A resumed state must match it. FNV-1a, stable across builds and
    /// platforms.
    #[must_use]
    pub fn digest(&self, variables: &[&str]) -> u64 {
        let mut names = variables.to_vec();
        names.sort_unstable();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &byte in bytes {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for name in names {
            eat(name.as_bytes());
            eat(&[0]);
        }
        for index in self.eligible.iter().flatten() {
            eat(&(*index as u64).to_le_bytes());
        }
        hash
    }

    /// The rank's chunks for `epoch`, in the rank's order.
    fn rank_order(&self, epoch: usize) -> Arc<Vec<ChunkId>> {
        let mut cache = self.cache.lock().expect("sampler cache");
        if let Some((_, order)) = cache.iter().find(|(e, _)| *e == epoch) {
            return order.clone();
        }
        let mut all = self.eligible.clone();
        if self.shuffle {
            all.shuffle(&mut rng_for(self.seed, 0, epoch as u64));
        }
        let k = self.rank_share();
        let rank = self.share.rank;
        let order: Arc<Vec<ChunkId>> = Arc::new(all[rank * k..(rank + 1) * k].to_vec());
        if cache.len() >= 4 {
            cache.remove(0);
        }
        cache.push((epoch, order.clone()));
        order
    }

    /// This worker's chunks for `epoch`, in delivery order.
    #[must_use]
    pub fn epoch_order(&self, epoch: usize) -> Vec<ChunkId> {
        (0..self.jobs_per_epoch()).flat_map(|j| self.job(epoch * self.jobs_per_epoch() + j).chunks).collect()
    }

    /// Batches in the jobs before job `job` (counted from the first epoch's first): a job holds `mix`
    /// batches, the last of an epoch those left.
    #[must_use]
    pub fn batches_before(&self, job: usize) -> usize {
        let per = self.jobs_per_epoch().max(1);
        job / per * self.per_epoch() + (job % per * self.mix).min(self.per_epoch())
    }

    /// Job `job` (counted from the first epoch's first).
    #[must_use]
    pub fn job(&self, job: usize) -> Job {
        let per = self.jobs_per_epoch().max(1);
        let (epoch, j) = (job / per, job % per);
        let group = self.share.worker + j * self.share.workers;
        let order = self.rank_order(epoch);
        let start = (group * self.mix).min(order.len());
        let end = (start + self.mix).min(order.len());
        let Share { rank, world_size, .. } = self.share;
        let mixing = ((epoch * world_size + rank) * self.rank_groups() + group) as u64;
        Job { epoch, position: start, mixing, chunks: order[start..end].to_vec() }
    }

    /// The cursor (batches of this worker's epoch before it) of the batch at rank position `position`.
    #[must_use]
    pub fn cursor_of(&self, position: usize) -> usize {
        let group = position / self.mix;
        let ordinal = (group - self.share.worker) / self.share.workers;
        ordinal * self.mix + position % self.mix
    }
}

/// The chunks of one job: a group of up to `mix` consecutive chunks of a rank's order, assembled together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Rank position of its first chunk.
    pub position: usize,
    /// What its samples' mixing is drawn from: the group's index among all ranks' groups of all epochs, so
    /// that it is the same whatever the number of workers, and differs between ranks.
    pub mixing: u64,
    /// The chunks.
    pub chunks: Vec<ChunkId>,
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
                for id in &order {
                    prop_assert!(seen.insert(*id), "chunk {:?} given twice", id);
                }
            }
            prop_assert!(n - seen.len() < world);
        }

        /// Whatever the number of workers, a rank's groups (the chunks of each batch) are the same: the
        /// workers take whole groups, none twice, none lost; positions are the rank's, and each worker's
        /// cursors count its own batches from 0.
        #[test]
        fn workers_take_whole_groups(n in 0usize..120, world in 1usize..4, workers in 1usize..5, mix in 1usize..5, epoch in 0usize..3) {
            let rank = Share { rank: world - 1, world_size: world, ..Share::ALL };
            let alone = Sampler::new(ids(n), 11, true, rank, mix);
            let groups = |s: &Sampler| -> Vec<Job> {
                (0..s.jobs_per_epoch()).map(|j| s.job(epoch * s.jobs_per_epoch() + j)).collect()
            };
            let whole = groups(&alone);
            let mut joined = Vec::new();
            for worker in 0..workers {
                let s = Sampler::new(ids(n), 11, true, Share { worker, workers, ..rank }, mix);
                let mine = groups(&s);
                prop_assert_eq!(mine.iter().map(|j| j.chunks.len()).sum::<usize>(), s.per_epoch());
                let mut cursor = 0;
                for job in &mine {
                    for k in 0..job.chunks.len() {
                        prop_assert_eq!(s.cursor_of(job.position + k), cursor + k);
                    }
                    cursor += job.chunks.len();
                }
                prop_assert_eq!(s.batches_before(s.jobs_per_epoch()), s.per_epoch());
                joined.extend(mine);
            }
            joined.sort_by_key(|j| j.position);
            prop_assert_eq!(joined, whole);
        }

        /// A single rank sees a permutation of every chunk, different per epoch, the same for the same seed.
        #[test]
        fn shuffle_is_a_seeded_permutation(n in 1usize..200, seed in 0u64..1000) {
            let s = Sampler::new(ids(n), seed, true, Share::ALL, 1);
            let mut order = s.epoch_order(0);
            let again = Sampler::new(ids(n), seed, true, Share::ALL, 1).epoch_order(0);
            prop_assert_eq!(&order, &*again);
            order.sort_unstable();
            prop_assert_eq!(order, ids(n).into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn digest_follows_the_variables_and_the_eligible_chunks() {
        let s = Sampler::new(ids(20), 0, true, Share::ALL, 1);
        let d = s.digest(&["a", "b"]);
        assert_eq!(d, s.digest(&["b", "a"]));
        assert_ne!(d, s.digest(&["a"]));
        assert_ne!(d, Sampler::new(ids(19), 0, true, Share::ALL, 1).digest(&["a", "b"]));
        // The seed, the share and the mixing are in the state itself.
        assert_eq!(
            d,
            Sampler::new(ids(20), 5, false, Share { rank: 1, world_size: 2, ..Share::ALL }, 3)
                .digest(&["a", "b"])
        );
        // Stable across builds (FNV-1a as Python computes it): a state saved by one version resumes in the next.
        assert_eq!(Sampler::new(ids(2), 0, true, Share::ALL, 1).digest(&["t2m"]), 0xdf75_6383_58e1_b0df);
    }

    #[test]
    fn workers_split_a_rank_without_loss() {
        let rank = Sampler::new(ids(23), 3, true, Share { rank: 1, world_size: 2, ..Share::ALL }, 1);
        let mut joined: Vec<ChunkId> = (0..3)
            .flat_map(|w| {
                let share = Share { rank: 1, world_size: 2, worker: w, workers: 3 };
                let s = Sampler::new(ids(23), 3, true, share, 1);
                assert_eq!(s.per_epoch(), s.epoch_order(2).len());
                s.epoch_order(2)
            })
            .collect();
        let mut whole = rank.epoch_order(2);
        joined.sort_unstable();
        whole.sort_unstable();
        assert_eq!(joined, whole);
    }

    #[test]
    fn epochs_differ_and_jobs_group_by_mix() {
        let s = Sampler::new(ids(50), 7, true, Share::ALL, 4);
        assert_ne!(s.epoch_order(0), s.epoch_order(1));
        assert_eq!(s.jobs_per_epoch(), 13);
        let job = s.job(13);
        assert_eq!((job.epoch, job.position, job.chunks.len()), (1, 0, 4));
        let job = s.job(12);
        assert_eq!((job.position, job.chunks.len()), (48, 2));
        let plain = Sampler::new(ids(5), 7, false, Share::ALL, 1);
        assert_eq!(*plain.epoch_order(3), ids(5));
        // The batches of the jobs before each job, against the jobs' own chunks counted.
        for job in 0..40 {
            let counted: usize = (0..job).map(|j| s.job(j).chunks.len()).sum();
            assert_eq!(s.batches_before(job), counted, "job {job}");
        }
    }
}
