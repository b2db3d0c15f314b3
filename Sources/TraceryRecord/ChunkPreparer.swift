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
    case unmap(UInt, size: Int)
  }
  private var queue: [Job] = []
  private var running = false

  private init() {
    mutex = .allocate(capacity: 1)
    wake = .allocate(capacity: 1)
    pthread_mutex_init(mutex, nil)
    pthread_cond_init(wake, nil)
    pthread_atfork(
      { pthread_mutex_lock(ChunkPreparer.shared.mutex) },
      { pthread_mutex_unlock(ChunkPreparer.shared.mutex) },
      {
        let preparer = ChunkPreparer.shared
        preparer.queue = []
        preparer.running = false
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

  /// Unmaps a chunk its thread is done with: on the helper when it runs, else at once.
  func unmap(_ chunk: UnsafeMutableRawPointer, _ size: Int) {
    pthread_mutex_lock(mutex)
    let queued = running
    if queued {
      queue.append(.unmap(UInt(bitPattern: chunk), size: size))
      pthread_cond_signal(wake)
    }
    pthread_mutex_unlock(mutex)
    if !queued { munmap(chunk, size) }
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

  private func serve() -> UnsafeMutableRawPointer? {
    while true {
      pthread_mutex_lock(mutex)
      while queue.isEmpty { pthread_cond_wait(wake, mutex) }
      let job = queue.removeFirst()
      pthread_mutex_unlock(mutex)
      switch job {
      case .prepare(let file, let index): file.prepare(index)
      case .unmap(let address, let size): munmap(UnsafeMutableRawPointer(bitPattern: address), size)
      }
    }
  }
}
