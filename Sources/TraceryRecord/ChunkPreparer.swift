#if canImport(Glibc)
  import Glibc
#endif

/// A helper thread that maps each event file's next chunk and faults its pages in (writable)
/// before the recording thread needs it.
///
/// Why: most of a recorded call's cost was the kernel's, not ours. A fresh page of a shared file
/// mapping costs ~2.6 µs on first write (page-cache allocation, zeroing, the filesystem's
/// `page_mkwrite`, dirty accounting): 20 of 33 ns per call at 32 bytes per call. Threads share
/// page tables, so faulting the pages in on another thread (another core) takes that work off the
/// traced thread.
///
/// Protocol: `request` is called by a file's owning thread (from the recorder's refill); the
/// helper thread only runs `EventFile.prepare`. The queue is guarded by `mutex`; a file's
/// prepared chunk by the file's own lock. Across `fork` the queue lock is held (pthread_atfork),
/// and the child starts with an empty queue and no helper (one is started on its first request).
final class ChunkPreparer: @unchecked Sendable {
  // @unchecked: every field is guarded by `mutex`.
  static let shared = ChunkPreparer()

  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let wake: UnsafeMutablePointer<pthread_cond_t>
  private enum Job {
    case prepare(EventFile, index: Int)
    case retire(UInt, size: Int, length: Int)
  }
  private var queue: [Job] = []
  private var running = false
  /// The helper is sealing a chunk now (`drain` waits for it).
  private var retiring = false
  /// The helper runs a job now (`quiesce` waits for it).
  private var working = false
  private let idle: UnsafeMutablePointer<pthread_cond_t>

  private init() {
    mutex = .allocate(capacity: 1)
    wake = .allocate(capacity: 1)
    idle = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(wake, nil)
    pthread_cond_init(idle, nil)
    Self.retire(Self.retirements([]))
    pthread_atfork(
      { pthread_mutex_lock(ChunkPreparer.shared.mutex) },
      { pthread_mutex_unlock(ChunkPreparer.shared.mutex) },
      {
        let preparer = ChunkPreparer.shared
        preparer.queue = []
        preparer.running = false
        preparer.retiring = false
        preparer.working = false
        pthread_mutex_unlock(preparer.mutex)
      })
  }

  /// Asks for chunk `index` of `file` to be prepared. Never blocks on the helper's work.
  func request(_ file: EventFile, index: Int) {
    pthread_mutex_lock(mutex)
    queue.append(.prepare(file, index: index))
    if !running { running = startHelper() }
    pthread_cond_signal(wake)
    pthread_mutex_unlock(mutex)
  }

  /// Seals a chunk its thread is done with (its events take `length` bytes after the seal) and
  /// unmaps it: on the helper when it runs, else at once.
  func retire(_ chunk: UnsafeMutableRawPointer, _ size: Int, sealing length: Int) {
    pthread_mutex_lock(mutex)
    let queued = running
    if queued {
      queue.append(.retire(UInt(bitPattern: chunk), size: size, length: length))
      pthread_cond_signal(wake)
    }
    pthread_mutex_unlock(mutex)
    if !queued { Self.retire(chunk, size, length) }
  }

  private static func retire(_ chunk: UnsafeMutableRawPointer, _ size: Int, _ length: Int) {
    ChunkSeal.seal(chunk, length: length)
    munmap(chunk, size)
  }

  /// Called with `mutex` held. false when no thread could be made (chunks are then mapped by
  /// their threads, as without a helper).
  private func startHelper() -> Bool {
    var thread = pthread_t()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    defer { pthread_attr_destroy(&attributes) }
    let made = pthread_create(&thread, &attributes, { _ in ChunkPreparer.shared.serve() }, nil) == 0
    if !made { queue = [] }
    return made
  }

  /// At process exit: seals and unmaps, on the calling thread, the chunks still waiting for the
  /// helper, and waits for the one it may be sealing (else they would stay unsealed).
  func drain() {
    pthread_mutex_lock(mutex)
    let waiting = Self.retirements(queue)
    queue.removeAll()
    while retiring { pthread_cond_wait(idle, mutex) }
    pthread_mutex_unlock(mutex)
    Self.retire(waiting)
  }

  /// The retire jobs among `jobs`, and retiring them: `drain`'s generic code, also run once
  /// (with nothing) when the preparer is made. A forked child's first use of a generic
  /// conformance looks its witness table up under a lock of the Swift runtime, which another
  /// thread of the parent may have held at the fork: a child stopped in `_exit` for good there.
  private static func retirements(_ jobs: [Job]) -> [(UInt, Int, Int)] {
    jobs.compactMap { job in
      if case .retire(let address, let size, let length) = job { (address, size, length) } else { nil }
    }
  }

  private static func retire(_ chunks: [(UInt, Int, Int)]) {
    for (address, size, length) in chunks { retire(UnsafeMutableRawPointer(bitPattern: address)!, size, length) }
  }

  /// Waits until the helper has run every job asked for and is waiting for the next: before the
  /// program installs a seccomp filter, which may kill the process for the helper's system
  /// calls (after it, nothing asks the helper for anything: `Agent.enterSandbox`).
  func quiesce() {
    pthread_mutex_lock(mutex)
    while running && (!queue.isEmpty || working) { pthread_cond_wait(idle, mutex) }
    pthread_mutex_unlock(mutex)
  }

  private func serve() -> UnsafeMutableRawPointer? {
    EventFile.helperThreadStarts?()
    while true {
      pthread_mutex_lock(mutex)
      while queue.isEmpty { pthread_cond_wait(wake, mutex) }
      let job = queue.removeFirst()
      if case .retire = job { retiring = true }
      working = true
      pthread_mutex_unlock(mutex)
      switch job {
      case .prepare(let file, let index): file.prepare(index)
      case .retire(let address, let size, let length):
        Self.retire(UnsafeMutableRawPointer(bitPattern: address)!, size, length)
      }
      pthread_mutex_lock(mutex)
      retiring = false
      working = false
      pthread_cond_broadcast(idle)
      pthread_mutex_unlock(mutex)
    }
  }
}
