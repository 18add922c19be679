// facegate example client in C++: CheckLiveness on image files, IdentifyFromClip on a folder of frames.
//
//   facegate_client [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] liveness IMAGE...
//   facegate_client [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] identify COLLECTION DIR --fps F
//
// Caller identity: --token-file FILE sends "authorization: Bearer <token>" on every call; --tls-cert FILE and
// --tls-key FILE (with --tls-ca) present a client certificate for mutual TLS.
//
// One tab-separated line per answer; exit status 1 if any call failed.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "facegate/v1/identification.grpc.pb.h"
#include "facegate/v1/liveness.grpc.pb.h"

namespace fs = std::filesystem;
namespace v1 = facegate::v1;

namespace {

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// Frames ordered by the last number in their file name (img12.jpg before img100.jpg).
std::vector<fs::path> FramesOf(const fs::path& dir) {
  static const std::regex digits("(\\d+)");
  std::vector<std::pair<long long, fs::path>> frames;
  for (const auto& e : fs::directory_iterator(dir)) {
    auto ext = e.path().extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
    if (ext != ".jpg" && ext != ".jpeg" && ext != ".png" && ext != ".webp" && ext != ".bmp") continue;
    long long n = -1;
    auto stem = e.path().stem().string();
    for (std::sregex_iterator it(stem.begin(), stem.end(), digits), end; it != end; ++it) n = std::stoll((*it)[1]);
    frames.emplace_back(n, e.path());
  }
  std::sort(frames.begin(), frames.end());
  std::vector<fs::path> out;
  for (auto& f : frames) out.push_back(f.second);
  return out;
}

std::string Error(const grpc::Status& s) {
  return "ERROR\t" + std::to_string(static_cast<int>(s.error_code())) + "\t" + s.error_message();
}

}  // namespace

int main(int argc, char** argv) {
  std::string target = "127.0.0.1:50051", ca_file, token_file, cert_file, key_file;
  int deadline_ms = 10000;
  double fps = 0;
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--target" && i + 1 < argc) target = argv[++i];
    else if (a == "--deadline-ms" && i + 1 < argc) deadline_ms = std::stoi(argv[++i]);
    else if (a == "--tls-ca" && i + 1 < argc) ca_file = argv[++i];
    else if (a == "--token-file" && i + 1 < argc) token_file = argv[++i];
    else if (a == "--tls-cert" && i + 1 < argc) cert_file = argv[++i];
    else if (a == "--tls-key" && i + 1 < argc) key_file = argv[++i];
    else if (a == "--fps" && i + 1 < argc) fps = std::stod(argv[++i]);
    else args.push_back(a);
  }
  if (args.empty()) {
    std::cerr << "usage: facegate_client [--target H:P] [--deadline-ms N] [--tls-ca F] [--tls-cert F --tls-key F] "
                 "[--token-file F] liveness IMAGE... | "
                 "identify COLLECTION DIR --fps F\n";
    return 2;
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!ca_file.empty()) {
    grpc::SslCredentialsOptions opts;
    opts.pem_root_certs = ReadFile(ca_file);
    if (!cert_file.empty()) {  // mutual TLS: the client certificate identifies the caller
      opts.pem_cert_chain = ReadFile(cert_file);
      opts.pem_private_key = ReadFile(key_file);
    }
    creds = grpc::SslCredentials(opts);
  }
  std::string token;
  if (!token_file.empty()) {
    token = ReadFile(token_file);
    token.erase(token.find_last_not_of(" \r\n\t") + 1);
  }
  // Every call: its deadline, and the bearer token when one is given.
  auto prepare = [&](grpc::ClientContext& ctx) {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  };
  grpc::ChannelArguments ch_args;
  ch_args.SetMaxSendMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(target, creds, ch_args);
  int failures = 0;

  if (args[0] == "liveness") {
    auto stub = v1::LivenessService::NewStub(channel);
    for (size_t i = 1; i < args.size(); ++i) {
      v1::CheckLivenessRequest req;
      req.mutable_image()->set_data(ReadFile(args[i]));
      v1::CheckLivenessResponse resp;
      grpc::ClientContext ctx;
      prepare(ctx);
      grpc::Status s = stub->CheckLiveness(&ctx, req, &resp);
      if (!s.ok()) {
        std::cout << args[i] << "\t" << Error(s) << "\n";
        ++failures;
        continue;
      }
      std::string decision = v1::Decision_Name(resp.decision()).substr(std::string("DECISION_").size());
      std::printf("%s\t%s\tlive_score=%.9f\n", args[i].c_str(), decision.c_str(), resp.live_score());
    }
  } else if (args[0] == "identify" && args.size() == 3) {
    auto stub = v1::IdentificationService::NewStub(channel);
    v1::IdentifyFromClipRequest req;
    req.set_collection(args[1]);
    req.set_top_k(3);
    req.mutable_clip()->set_fps(fps);
    for (const auto& f : FramesOf(args[2])) req.mutable_clip()->add_frames()->set_data(ReadFile(f));
    v1::IdentifyFromClipResponse resp;
    grpc::ClientContext ctx;
    prepare(ctx);
    grpc::Status s = stub->IdentifyFromClip(&ctx, req, &resp);
    if (!s.ok()) {
      std::cout << args[2] << "\t" << Error(s) << "\n";
      return 1;
    }
    std::string decision = v1::MatchDecision_Name(resp.decision()).substr(std::string("MATCH_DECISION_").size());
    std::string top = resp.candidates_size() ? resp.candidates(0).person_id() : "-";
    double score = resp.candidates_size() ? resp.candidates(0).score() : 0.0;
    std::printf("%s\t%s\tcandidate=%s\tscore=%.9f\n", args[2].c_str(), decision.c_str(), top.c_str(), score);
  } else {
    std::cerr << "unknown command\n";
    return 2;
  }
  return failures ? 1 : 0;
}
