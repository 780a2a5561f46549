//! The roles of a distributed run: the same jobs as the in-process actors,
//! fed by `prism-transport` (Redis Streams, gRPC, NCCL) instead of channels.
//!
//! - [`learner`]: the learner process: the prompt source and metrics actors,
//!   groups read back from the labelled stream, training, publishing weights.
//! - [`learner_rank`]: a data-parallel learner rank that trains each step
//!   rank 0 publishes.
//! - [`rollout`]: a rollout process: the in-process
//!   [`RolloutWorker`](crate::rollout_worker::RolloutWorker) actor with ports
//!   on the transport — work from the learner's Control service, weights over
//!   gRPC or NCCL, trajectories to the sampled stream.
//! - [`reward`]: a reward process: the sampled stream labelled, results to the
//!   labelled stream, judged steps shared with every other reward process.
//!   Its job is not the reward pool's: the stream's consumer group does what
//!   the pool does in one process (hand out, retry elsewhere, take over from a
//!   dead worker), and the learner assembles groups, so a reward process is
//!   one consumer that labels entries concurrently and acknowledges them.

pub mod learner;
pub mod learner_rank;
pub mod reward;
pub mod rollout;
