import ArgumentParser
import Foundation

@main
struct Tracery: ParsableCommand {
  /// Like ParsableCommand's main, but a usage error is one line on stderr ("tracery: ...").
  static func main() {
    do {
      var command = try parseAsRoot()
      try command.run()
    } catch {
      let code = exitCode(for: error)
      if code == .validationFailure {
        let message = message(for: error).split(separator: "\n").first.map(String.init) ?? "invalid arguments"
        FileHandle.standardError.write(Data("tracery: \(message)\n".utf8))
        Foundation.exit(code.rawValue)
      }
      exit(withError: error)
    }
  }

  static let configuration = CommandConfiguration(
    commandName: "tracery",
    abstract: "Function tracing for native Linux programs: the kernel's ftrace machinery in user space.",
    version: "0.1.0",
    subcommands: [Record.self, Replay.self, Report.self, Info.self, Dump.self, Live.self, List.self, Bench.self]
  )
}

/// A failure the user can act on: printed as one line on stderr, exit status 1.
struct UserError: Error, CustomStringConvertible {
  let description: String
  init(_ description: String) { self.description = description }
}

extension ParsableCommand {
  /// Runs `body`, turning a `UserError` into one clear line on stderr and exit status 1.
  func reportingUserErrors(_ body: () throws -> Void) throws {
    do {
      try body()
    } catch let error as UserError {
      FileHandle.standardError.write(Data("tracery: \(error.description)\n".utf8))
      throw ExitCode(1)
    }
  }
}
