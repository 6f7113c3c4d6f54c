//! The queue of waiting jobs, shaped for the scheduler's three rules:
//! higher priority first; within a priority, round-robin between clients; FIFO
//! within a client. Jobs are further grouped by *class* (their requirements), so a
//! worker looking for work skips whole classes it cannot run instead of scanning
//! jobs: a job waiting for a 48 GiB GPU never blocks a small job behind it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kiln_protocol::{Backend, JobId};

/// Index of a [`Requirements`] in the queue's class table.
pub type ClassId = u32;

/// What a worker must have to run a job. Jobs with equal requirements form a class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirements {
    pub backend: Backend,
    pub model: Option<String>,
    pub min_vram_mb: u64,
    /// Sorted and deduplicated.
    pub labels: Vec<String>,
}

/// A job a worker could take next (see [`Queue::candidates`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub job: JobId,
    pub priority: i8,
    pub class: ClassId,
    pub seq: u64,
    /// Its client's place in the rotation: 0 is the client whose turn it is.
    pub turn: u32,
}

impl Requirements {
    /// What a job asks of a worker: the one place a spec becomes requirements
    /// (`min_vram_mb` is the job's current floor, raised after out-of-memory).
    pub fn of(spec: &kiln_protocol::JobSpec, min_vram_mb: u64) -> Requirements {
        let mut labels = spec.labels.clone();
        labels.sort_unstable();
        labels.dedup();
        Requirements {
            backend: spec.backend,
            model: spec.model.clone(),
            min_vram_mb,
            labels,
        }
    }
}

/// Where a queued job sits, so it can be removed without a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub priority: i8,
    pub class: ClassId,
    pub seq: u64,
}

#[derive(Default)]
pub struct Queue {
    classes: Vec<Requirements>,
    class_ids: HashMap<Requirements, ClassId>,
    levels: BTreeMap<Reverse<i8>, Level>,
    len: usize,
    /// Jobs waiting per model, over every class that names it (placement asks
    /// for each candidate it weighs).
    model_len: HashMap<String, u32>,
    /// Per model with jobs waiting: since when idle GPUs have been left idle
    /// rather than load it (see [`Queue::note_left_idle`]).
    left_idle: HashMap<String, LeftIdle>,
}

/// Since when idle GPUs have been left idle rather than load a model for its
/// waiting jobs (placement's waiting clock, see `Core::waited_out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftIdle {
    pub since_ms: u64,
    /// Whether idle workers were offered the queue again once the wait was
    /// over (it is done once per clock).
    pub reoffered: bool,
}

/// One priority level: clients in round-robin order, each with its lanes.
#[derive(Default)]
struct Level {
    ring: Vec<Arc<str>>,
    cursor: usize,
    lanes: HashMap<Arc<str>, Lanes>,
}

impl Level {
    /// Takes job `seq` from lane `lane` of the client at ring position `at`, and
    /// moves the rotation past that client (dropping the client once it has
    /// nothing left waiting at this level).
    fn take_at(&mut self, at: usize, lane: usize, seq: u64) -> JobId {
        let n = self.ring.len();
        let lanes = self
            .lanes
            .get_mut(&self.ring[at])
            .expect("ring matches lanes");
        let job = lanes.by_class[lane]
            .1
            .remove(&seq)
            .expect("job in its lane");
        if lanes.by_class[lane].1.is_empty() {
            lanes.by_class.swap_remove(lane);
        }
        if lanes.by_class.is_empty() {
            let client = self.ring[at].clone();
            Queue::drop_client(self, &client);
            // The next client has moved into position `at`.
            self.cursor = if self.ring.is_empty() {
                0
            } else {
                at % self.ring.len()
            };
        } else {
            self.cursor = (at + 1) % n;
        }
        job
    }
}

/// One client's waiting jobs at one priority, a FIFO per class keyed by enqueue
/// sequence number.
#[derive(Default)]
struct Lanes {
    by_class: Vec<(ClassId, BTreeMap<u64, JobId>)>,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The highest priority with a job waiting.
    pub fn top_priority(&self) -> Option<i8> {
        self.levels.keys().next().map(|Reverse(p)| *p)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The class id for `req`, creating it on first sight. Classes are few (one per
    /// distinct backend/model/VRAM/labels combination) and never removed.
    pub fn class_of(&mut self, mut req: Requirements) -> ClassId {
        req.labels.sort();
        req.labels.dedup();
        if let Some(&id) = self.class_ids.get(&req) {
            return id;
        }
        let id = self.classes.len() as ClassId;
        self.classes.push(req.clone());
        self.class_ids.insert(req, id);
        id
    }

    pub fn requirements(&self, class: ClassId) -> &Requirements {
        &self.classes[class as usize]
    }

    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    pub fn push(&mut self, job: JobId, client: &Arc<str>, slot: Slot) {
        let level = self.levels.entry(Reverse(slot.priority)).or_default();
        let lanes = level.lanes.entry(client.clone()).or_insert_with(|| {
            level.ring.push(client.clone());
            Lanes::default()
        });
        let lane = match lanes
            .by_class
            .iter_mut()
            .position(|(c, _)| *c == slot.class)
        {
            Some(i) => &mut lanes.by_class[i].1,
            None => {
                lanes.by_class.push((slot.class, BTreeMap::new()));
                &mut lanes.by_class.last_mut().expect("just pushed").1
            }
        };
        lane.insert(slot.seq, job);
        self.len += 1;
        if let Some(m) = &self.classes[slot.class as usize].model {
            *self.model_len.entry(m.clone()).or_insert(0) += 1;
        }
    }

    /// Counts a job that left class `class`.
    fn uncount(&mut self, class: ClassId) {
        self.len -= 1;
        if let Some(m) = &self.classes[class as usize].model {
            if let Some(n) = self.model_len.get_mut(m) {
                *n -= 1;
                if *n == 0 {
                    self.model_len.remove(m);
                    self.left_idle.remove(m);
                }
            }
        }
    }

    /// Removes a queued job (cancel, timeout). Returns whether it was there.
    pub fn remove(&mut self, client: &Arc<str>, slot: Slot) -> bool {
        let key = Reverse(slot.priority);
        let Some(level) = self.levels.get_mut(&key) else {
            return false;
        };
        let Some(lanes) = level.lanes.get_mut(client) else {
            return false;
        };
        let Some(i) = lanes.by_class.iter().position(|(c, _)| *c == slot.class) else {
            return false;
        };
        if lanes.by_class[i].1.remove(&slot.seq).is_none() {
            return false;
        }
        if lanes.by_class[i].1.is_empty() {
            lanes.by_class.swap_remove(i);
        }
        if lanes.by_class.is_empty() {
            Self::drop_client(level, client);
        }
        if level.lanes.is_empty() {
            self.levels.remove(&key);
        }
        self.uncount(slot.class);
        true
    }

    /// Takes the next job for a worker that can run the classes for which
    /// `can_run` says true: the highest priority level with such a job, the next
    /// client in that level's rotation that has one, and that client's oldest.
    pub fn pop_for(&mut self, can_run: impl FnMut(ClassId) -> bool) -> Option<JobId> {
        let mut cands = Vec::new();
        self.candidates(can_run, 1, &mut cands);
        let first = Self::first_in_order(&cands)?;
        Some(self.take(&cands[first]))
    }

    /// Of candidates from [`Queue::candidates`] (perhaps some left out), the one
    /// queue order takes first: the client whose turn is nearest, its oldest job.
    pub fn first_in_order(cands: &[Candidate]) -> Option<usize> {
        (0..cands.len()).min_by_key(|&i| (cands[i].turn, cands[i].seq))
    }

    /// The jobs a worker could take next: the oldest job of each runnable class
    /// of the next `max_clients` clients that have one, at the highest priority
    /// level that has one, clients in their rotation order starting with the one
    /// whose turn it is. Pass the one chosen to [`Queue::take`].
    pub fn candidates(
        &self,
        mut can_run: impl FnMut(ClassId) -> bool,
        max_clients: usize,
        into: &mut Vec<Candidate>,
    ) {
        into.clear();
        for (key, level) in self.levels.iter() {
            let n = level.ring.len();
            let mut clients = 0;
            for step in 0..n {
                if clients >= max_clients {
                    break;
                }
                let before = into.len();
                let at = (level.cursor + step) % n;
                let lanes = &level.lanes[&level.ring[at]];
                for (class, q) in &lanes.by_class {
                    if !can_run(*class) {
                        continue;
                    }
                    if let Some((seq, job)) = q.first_key_value() {
                        into.push(Candidate {
                            job: *job,
                            priority: key.0,
                            class: *class,
                            seq: *seq,
                            turn: step as u32,
                        });
                    }
                }
                clients += (into.len() > before) as usize;
            }
            if !into.is_empty() {
                return;
            }
        }
    }

    /// Takes a candidate from [`Queue::candidates`] out of the queue; the client
    /// rotation moves past its client.
    pub fn take(&mut self, c: &Candidate) -> JobId {
        let key = Reverse(c.priority);
        let level = self.levels.get_mut(&key).expect("candidate level");
        let at = (level.cursor + c.turn as usize) % level.ring.len();
        let lane = level.lanes[&level.ring[at]]
            .by_class
            .iter()
            .position(|(class, _)| *class == c.class)
            .expect("candidate lane");
        let job = level.take_at(at, lane, c.seq);
        self.count_taken(key, c.class);
        job
    }

    /// Notes that an idle GPU was left idle at `now_ms` rather than load
    /// `model` for its waiting jobs; the first such time counts until the
    /// model's jobs stop waiting or a GPU loads it ([`Queue::clear_left_idle`]).
    pub fn note_left_idle(&mut self, model: &str, now_ms: u64) {
        if self.model_len.contains_key(model) && !self.left_idle.contains_key(model) {
            let clock = LeftIdle {
                since_ms: now_ms,
                reoffered: false,
            };
            self.left_idle.insert(model.to_string(), clock);
        }
    }

    /// Since when idle GPUs have been left idle rather than load `model`.
    pub fn left_idle_since(&self, model: &str) -> Option<u64> {
        self.left_idle.get(model).map(|c| c.since_ms)
    }

    /// Every model's waiting clock.
    pub fn left_idle(&self) -> impl Iterator<Item = (&str, LeftIdle)> {
        self.left_idle.iter().map(|(m, c)| (m.as_str(), *c))
    }

    /// Idle workers were offered the queue once `model`'s wait was over.
    pub fn mark_reoffered(&mut self, model: &str) {
        if let Some(c) = self.left_idle.get_mut(model) {
            c.reoffered = true;
        }
    }

    /// A GPU loads `model`: its waiting jobs' rent is paid.
    pub fn clear_left_idle(&mut self, model: &str) {
        self.left_idle.remove(model);
    }

    /// Jobs waiting for `model`, over every class that names it.
    pub fn waiting_for_model(&self, model: &str) -> u32 {
        self.model_len.get(model).copied().unwrap_or(0)
    }

    /// Counts a job taken out of level `key`, dropping the level once empty.
    fn count_taken(&mut self, key: Reverse<i8>, class: ClassId) {
        self.uncount(class);
        if self.levels.get(&key).is_some_and(|l| l.lanes.is_empty()) {
            self.levels.remove(&key);
        }
    }

    fn drop_client(level: &mut Level, client: &Arc<str>) {
        level.lanes.remove(client);
        if let Some(pos) = level.ring.iter().position(|c| c == client) {
            level.ring.remove(pos);
            if pos < level.cursor {
                level.cursor -= 1;
            }
            if level.cursor >= level.ring.len() {
                level.cursor = 0;
            }
        }
    }

    /// How many jobs wait per (backend, priority), for the queue-depth metric:
    /// O(clients × classes), not O(jobs).
    pub fn depths(&self) -> HashMap<(Backend, i8), usize> {
        let mut depths = HashMap::new();
        for (Reverse(priority), level) in &self.levels {
            for lanes in level.lanes.values() {
                for (class, q) in &lanes.by_class {
                    let backend = self.classes[*class as usize].backend;
                    *depths.entry((backend, *priority)).or_insert(0) += q.len();
                }
            }
        }
        depths
    }

    /// Every queued job's id with its slot, highest priority first (for queue
    /// positions and debugging; O(n)).
    pub fn iter(&self) -> impl Iterator<Item = (JobId, Slot)> + '_ {
        self.levels.iter().flat_map(|(Reverse(priority), level)| {
            level.lanes.values().flat_map(move |lanes| {
                lanes.by_class.iter().flat_map(move |(class, q)| {
                    q.iter().map(move |(seq, job)| {
                        (
                            *job,
                            Slot {
                                priority: *priority,
                                class: *class,
                                seq: *seq,
                            },
                        )
                    })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(vram: u64) -> Requirements {
        Requirements {
            backend: Backend::Sim,
            model: None,
            min_vram_mb: vram,
            labels: vec![],
        }
    }

    #[test]
    fn priority_then_round_robin_then_fifo() {
        let mut q = Queue::new();
        let c = q.class_of(req(0));
        let (a, b): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let mut seq = 0;
        let mut push = |q: &mut Queue, id: u64, client: &Arc<str>, priority: i8| {
            seq += 1;
            q.push(
                JobId(id),
                client,
                Slot {
                    priority,
                    class: c,
                    seq,
                },
            );
        };
        // Alice floods first, Bob arrives later, one urgent job last.
        for id in 1..=4 {
            push(&mut q, id, &a, 0);
        }
        for id in 5..=6 {
            push(&mut q, id, &b, 0);
        }
        push(&mut q, 7, &b, 5);
        let depths = q.depths();
        assert_eq!(depths.get(&(Backend::Sim, 0)), Some(&6));
        assert_eq!(depths.get(&(Backend::Sim, 5)), Some(&1));
        assert_eq!(depths.len(), 2);
        let order: Vec<u64> = std::iter::from_fn(|| q.pop_for(|_| true))
            .map(|j| j.0)
            .collect();
        assert_eq!(order, [7, 1, 5, 2, 6, 3, 4]);
        assert!(q.depths().is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn a_big_job_does_not_block_a_small_one() {
        let mut q = Queue::new();
        let big = q.class_of(req(40_000));
        let small = q.class_of(req(4_000));
        let c: Arc<str> = "c".into();
        q.push(
            JobId(1),
            &c,
            Slot {
                priority: 0,
                class: big,
                seq: 1,
            },
        );
        q.push(
            JobId(2),
            &c,
            Slot {
                priority: 0,
                class: small,
                seq: 2,
            },
        );
        // A 24 GiB worker can only run the small class.
        assert_eq!(q.pop_for(|class| class == small), Some(JobId(2)));
        assert_eq!(q.pop_for(|class| class == small), None);
        assert_eq!(q.pop_for(|_| true), Some(JobId(1)));
    }

    #[test]
    fn remove_keeps_rotation_consistent() {
        let mut q = Queue::new();
        let k = q.class_of(req(0));
        let clients: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|s| Arc::from(*s)).collect();
        for (i, c) in clients.iter().enumerate() {
            q.push(
                JobId(i as u64 + 1),
                c,
                Slot {
                    priority: 0,
                    class: k,
                    seq: i as u64 + 1,
                },
            );
        }
        assert_eq!(q.pop_for(|_| true), Some(JobId(1)));
        assert!(q.remove(
            &clients[1],
            Slot {
                priority: 0,
                class: k,
                seq: 2
            }
        ));
        assert!(!q.remove(
            &clients[1],
            Slot {
                priority: 0,
                class: k,
                seq: 2
            }
        ));
        assert_eq!(q.pop_for(|_| true), Some(JobId(3)));
        assert_eq!(q.len(), 0);
        assert_eq!(q.iter().count(), 0);
    }
}
